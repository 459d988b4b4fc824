"""`cpu_kernels.bf16_matmul`: float32 x (..., K) @ bfloat16 w (K, N) -> float32 (..., N) through
an XLA FFI custom call on CPU, against a float64 NumPy reference on fresh random inputs.

Error bound: a float32 sum of K products computed in any order differs from the exact sum by at
most ~K u sum_k |x_k w_kn| (u = 2^-24); the checks allow 2 K u of it. Integer-valued inputs
whose sums are exact in float32 must match exactly. The kernel is built on first use; only a
missing compiler skips (a failing build is a failure)."""

import importlib
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels import _build

matmul_lib = importlib.import_module("cpu_kernels.bf16_matmul")
U = 2.0 ** -24


def _compiler_missing() -> str | None:
  try:
    _build.find_compiler()
  except _build.BuildError as e:
    return str(e)
  return None


@pytest.fixture(scope="module", autouse=True)
def kernel():
  missing = _compiler_missing()
  if missing is not None:
    pytest.skip(f"no C++ compiler: {missing} ({cpu_kernels.unavailable_reason()})")
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


def _operands(rng, lead, k, n, scale=1.0):
  x = (rng.standard_normal(lead + (k,)) * scale).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
  return x, w


def _check(got, x, w):
  """got vs the float64 product of x and w's bfloat16 values, within 2 K u |x| |w|."""
  x64 = np.asarray(x, np.float64)
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  want = x64 @ w64
  bound = 2 * x64.shape[-1] * U * (np.abs(x64) @ np.abs(w64)) + 1e-30
  got = np.asarray(got)
  chex.assert_shape(got, want.shape)
  assert got.dtype == np.float32
  excess = np.abs(got - want) / bound
  assert excess.max() <= 1.0, f"error {excess.max():.2f} x the bound"


SHAPES = [(1, 1), (7, 5), (37, 29), (256, 768), (1024, 256), (300, 1001)]


@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_matches_float64(k, n, batch):
  rng = np.random.default_rng([k, n, batch])
  x, w = _operands(rng, (batch,), k, n)
  _check(cpu_kernels.bf16_matmul(x, w), x, w)


@pytest.mark.parametrize("lead", [(), (2, 3), (4, 1, 2)])
def test_leading_dims_are_rows(lead):
  rng = np.random.default_rng(len(lead))
  x, w = _operands(rng, lead, 45, 19)
  _check(cpu_kernels.bf16_matmul(x, w), x, w)


@pytest.mark.parametrize("batch", [1, 5])
def test_integer_inputs_are_exact(batch):
  """Small integers: every product and partial sum is exact in float32, so must be the result
  (a wrong row, column or bit pattern in the widening shows up as a different integer)."""
  rng = np.random.default_rng(batch)
  x = rng.integers(-4, 5, (batch, 131)).astype(np.float32)
  w = rng.integers(-64, 65, (131, 67)).astype(np.float32)
  got = cpu_kernels.bf16_matmul(x, jnp.asarray(w, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(got), x @ w)


def test_reads_the_bfloat16_values():
  """A weight that float32 holds but bfloat16 rounds (1 + 2^-10) is read as bfloat16 (1)."""
  x = np.ones((1, 1), np.float32)
  w = jnp.asarray(np.array([[1 + 2.0 ** -10, 3.0]], np.float32)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(cpu_kernels.bf16_matmul(x, w)), [[1.0, 3.0]])


def test_agrees_with_reference_and_jit():
  rng = np.random.default_rng(7)
  x, w = _operands(rng, (3,), 129, 65)
  got = jax.jit(cpu_kernels.bf16_matmul)(x, w)
  _check(got, x, w)
  np.testing.assert_allclose(np.asarray(got),
                             np.asarray(cpu_kernels.bf16_matmul_reference(x, w)),
                             rtol=1e-5, atol=1e-5)
  hlo = jax.jit(cpu_kernels.bf16_matmul).lower(x, w).compile().as_text()
  assert re.search(r'custom-call\([^)]*\), custom_call_target="lcsm_bf16_matmul"', hlo)
  assert not re.search(r"f32\[129,65\][^ ]* convert\(", hlo), "the weights were converted"


def test_vmap():
  """Batched activations with shared weights, batched weights, and nested maps."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((4, 3, 33)).astype(np.float32)
  ws = jnp.asarray(rng.standard_normal((4, 33, 17)), jnp.bfloat16)
  f = cpu_kernels.bf16_matmul
  _check(jax.vmap(f, (0, None))(x, ws[0]), x, ws[0])
  got = jax.jit(jax.vmap(f))(x, ws)
  for i in range(4):
    _check(got[i], x[i], ws[i])
  got = jax.vmap(jax.vmap(f, (None, 0)), (0, None))(x, ws)  # (4 x, 4 w, 3, 17)
  chex.assert_shape(got, (4, 4, 3, 17))
  for i in range(4):
    for j in range(4):
      _check(got[i, j], x[i], ws[j])


@pytest.mark.parametrize("x_shape,w_shape,x_dtype,w_dtype,error,pattern", [
    ((2, 8), (8, 4), np.float64, jnp.bfloat16, TypeError, r"x must be float32; got float64"),
    ((2, 8), (8, 4), np.float32, jnp.float32, TypeError, r"w must be bfloat16; got float32"),
    ((2, 8), (8, 4), jnp.bfloat16, jnp.bfloat16, TypeError, r"x must be float32"),
    ((2, 8), (2, 8, 4), np.float32, jnp.bfloat16, ValueError, r"w must be \(K, N\)"),
    ((2, 7), (8, 4), np.float32, jnp.bfloat16, ValueError,
     r"x must be \(\.\.\., K\) with K = 8 \(w's rows\); got shape \(2, 7\)"),
    ((), (8, 4), np.float32, jnp.bfloat16, ValueError, r"x must be \(\.\.\., K\)"),
])
def test_bad_operands_are_refused(x_shape, w_shape, x_dtype, w_dtype, error, pattern):
  x = np.zeros(x_shape, x_dtype) if x_dtype is np.float64 else jnp.zeros(x_shape, x_dtype)
  w = jnp.zeros(w_shape, w_dtype)
  with pytest.raises(error, match=pattern):
    cpu_kernels.bf16_matmul(x, w)
  with pytest.raises(error, match=pattern):
    cpu_kernels.bf16_matmul_reference(x, w)


def test_the_handler_checks_shapes():
  """The C++ handler refuses operands that do not fit (called past the Python checks)."""
  call = jax.ffi.ffi_call(matmul_lib.TARGET, jax.ShapeDtypeStruct((2, 5), jnp.float32))
  x, w = jnp.ones((2, 8), jnp.float32), jnp.ones((8, 4), jnp.bfloat16)
  with pytest.raises(Exception, match=r"need x \(\.\.\., B, K\), w \(\.\.\., K, N\), y "
                                      r"\(\.\.\., B, N\); got x \(2, 8\), w \(8, 4\), y \(2, 5\)"):
    jax.block_until_ready(call(x, w))
  call = jax.ffi.ffi_call(matmul_lib.TARGET, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  with pytest.raises(Exception, match=r"w must be bfloat16"):
    jax.block_until_ready(call(x, w.astype(jnp.float32)))


def _export(platforms, disabled=()):
  args = (jax.ShapeDtypeStruct((3, 64), jnp.float32), jax.ShapeDtypeStruct((64, 48), jnp.bfloat16))
  return jax.export.export(jax.jit(cpu_kernels.bf16_matmul), platforms=platforms,
                           disabled_checks=disabled)(*args)


def test_export_for_cpu_holds_the_custom_call():
  check = jax.export.DisabledSafetyCheck.custom_call(matmul_lib.TARGET)
  module = _export(("cpu",), (check,)).mlir_module()
  assert f"stablehlo.custom_call @{matmul_lib.TARGET}" in module
  assert "stablehlo.dot_general" not in module


def test_export_for_cuda_and_tpu_is_a_plain_dot():
  exported = _export(("cuda", "tpu"))
  module = exported.mlir_module()
  assert matmul_lib.TARGET not in module
  assert "stablehlo.dot_general" in module
  assert exported.out_avals[0].shape == (3, 48)


def test_switch_nests():
  assert cpu_kernels.enabled()
  with cpu_kernels.disabled():
    assert not cpu_kernels.enabled()
    with cpu_kernels.disabled():
      assert not cpu_kernels.enabled()
    assert not cpu_kernels.enabled()
  assert cpu_kernels.enabled()


def test_unavailable_kernel_raises_with_the_reason(monkeypatch):
  monkeypatch.setattr(matmul_lib.KERNEL, "state", {"ok": False, "reason": "BuildError: no compiler"})
  assert not cpu_kernels.available()
  with pytest.raises(RuntimeError, match="CPU kernel is unavailable: BuildError: no compiler"):
    cpu_kernels.bf16_matmul(jnp.ones((1, 4)), jnp.ones((4, 2), jnp.bfloat16))


def test_build_is_cached_by_key(tmp_path, monkeypatch):
  """The library is built into $LCSM_JAX_CACHE_DIR under a keyed name, then reused; another
  source gives another name; no temporary file is left behind."""
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path))
  first = _build.build(matmul_lib.SOURCE)
  assert first.parent == tmp_path and re.fullmatch(r"bf16_matmul-[0-9a-f]{16}\.so", first.name)
  stamp = os.stat(first).st_mtime_ns
  assert _build.build(matmul_lib.SOURCE) == first and os.stat(first).st_mtime_ns == stamp
  other = tmp_path / "bf16_matmul.cc"
  other.write_text(matmul_lib.SOURCE.read_text() + "\n// changed\n")
  assert _build.build(other) != first
  assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".cc") == sorted(
      [first.name, _build.build(other).name])


def test_compile_errors_are_reported(tmp_path, monkeypatch):
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path))
  bad = tmp_path / "broken.cc"
  bad.write_text("this is not C++\n")
  with pytest.raises(_build.BuildError, match=r"compiling broken\.cc failed"):
    _build.build(bad)
  assert [p.name for p in tmp_path.iterdir()] == ["broken.cc"]
