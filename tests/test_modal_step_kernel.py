"""`cpu_kernels.modal_step`: the 'modal' strategy's step as one XLA FFI custom call on CPU that
updates the state planes in place, against a float64 NumPy computation of its formulas:

  y   = sum_h (Re(Rp) xr - Im(Rp) xi) + total a      (S, B, D)
  xr' = Re p xr - Im p xi + a,  xi' = Re p xi + Im p xr   (S, B, H, D)

Error bound: a float32 sum of n terms computed in any order (with or without fused
multiply-adds) differs from the exact sum by at most ~n u sum |terms| (u = 2^-24); the checks
allow (n + 1) u of it. Small-integer inputs, whose sums are exact in float32, must match
exactly. The kernel is built on first use; only a missing compiler skips."""

import importlib
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels import _build
from lcsm_jax.decoding.strategies import base
from lcsm_jax.decoding.strategies import modal

step_lib = importlib.import_module("cpu_kernels.modal_step")
U = 2.0 ** -24


@pytest.fixture(scope="module", autouse=True)
def kernel():
  try:
    _build.find_compiler()
  except _build.BuildError as e:
    pytest.skip(f"no C++ compiler: {e}")
  assert step_lib.available(), step_lib.unavailable_reason()


def _operands(rng, s, b, h, d, integers=False):
  if integers:
    draw = lambda *shape: rng.integers(-4, 5, shape).astype(np.float32)
  else:
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return (draw(s, b, h, d), draw(s, b, h, d), draw(2, s, h, d), draw(2, s, h, d), draw(s, d),
          draw(s, b, d))


def _want(xr, xi, poles, residues, total, a):
  """(values, bounds) of (xr', xi', y) in float64."""
  xr, xi, poles, residues, total, a = (np.asarray(v, np.float64)
                                       for v in (xr, xi, poles, residues, total, a))
  pr, pi = poles[:, :, None]
  rr, ri = residues[:, :, None]
  h = xr.shape[2]
  terms_y = np.abs(rr * xr).sum(2) + np.abs(ri * xi).sum(2) + np.abs(total[:, None] * a)
  values = (pr * xr - pi * xi + a[:, :, None], pr * xi + pi * xr,
            (rr * xr - ri * xi).sum(2) + total[:, None] * a)
  bounds = (4 * U * (np.abs(pr * xr) + np.abs(pi * xi) + np.abs(a[:, :, None])),
            3 * U * (np.abs(pr * xi) + np.abs(pi * xr)),
            (2 * h + 2) * U * terms_y)
  return values, bounds


def _check(got, operands):
  values, bounds = _want(*operands)
  assert len(got) == 3
  for name, g, want, bound in zip(("xr'", "xi'", "y"), got, values, bounds):
    g = np.asarray(g)
    chex.assert_shape(g, want.shape)
    assert g.dtype == np.float32, name
    excess = np.abs(g - want) / (bound + 1e-30)
    assert excess.max() <= 1.0, f"{name}: error {excess.max():.2f} x the bound"


SHAPES = [(s, b, h, d) for s in (1, 5) for b in (1, 3) for h in (1, 8) for d in (3, 17, 257)]


@pytest.mark.parametrize("s,b,h,d", SHAPES, ids=[f"S{s}-B{b}-H{h}-D{d}" for s, b, h, d in SHAPES])
def test_matches_float64(s, b, h, d):
  rng = np.random.default_rng([s, b, h, d])
  operands = _operands(rng, s, b, h, d)
  _check(jax.jit(cpu_kernels.modal_step)(*operands), operands)


@pytest.mark.parametrize("s,b,h,d", [(1, 1, 1, 1), (5, 3, 8, 17), (2, 1, 8, 256)])
def test_integer_inputs_are_exact(s, b, h, d):
  """Every product and partial sum is exact: a wrong index shows up as another integer."""
  operands = _operands(np.random.default_rng(d), s, b, h, d, integers=True)
  got = cpu_kernels.modal_step(*operands)
  for g, want in zip(got, _want(*operands)[0]):
    np.testing.assert_array_equal(np.asarray(g), want)


def test_agrees_with_the_reference_and_is_one_custom_call():
  operands = _operands(np.random.default_rng(3), 2, 3, 4, 33)
  got = jax.jit(cpu_kernels.modal_step)(*operands)
  ref = cpu_kernels.modal_step_reference(*operands)
  _check(ref, operands)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(cpu_kernels.modal_step).lower(*operands).compile().as_text()
  assert len(re.findall(r'custom_call_target="lcsm_modal_step"', hlo)) == 1
  assert "output_to_operand_aliasing={{0}: (0, {}), {1}: (1, {})}" in hlo
  assert "fusion" not in hlo


def test_donated_state_is_updated_in_place():
  """With the state donated, the outputs are the inputs' buffers (no copy) and equal the
  reference."""
  operands = _operands(np.random.default_rng(4), 3, 2, 8, 64)
  want = cpu_kernels.modal_step_reference(*operands)
  xr, xi = jnp.asarray(operands[0]), jnp.asarray(operands[1])
  pointers = (xr.unsafe_buffer_pointer(), xi.unsafe_buffer_pointer())
  step = jax.jit(cpu_kernels.modal_step, donate_argnums=(0, 1))
  compiled = step.lower(xr, xi, *operands[2:]).compile().as_text()
  assert " copy(" not in compiled
  got = step(xr, xi, *operands[2:])
  assert (got[0].unsafe_buffer_pointer(), got[1].unsafe_buffer_pointer()) == pointers
  assert xr.is_deleted() and xi.is_deleted()
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_separate_result_buffers():
  """Called without aliases (results in fresh buffers), the handler copies the state first."""
  operands = _operands(np.random.default_rng(5), 2, 2, 3, 19)
  state = jax.ShapeDtypeStruct(operands[0].shape, jnp.float32)
  call = jax.ffi.ffi_call(step_lib.TARGET,
                          (state, state, jax.ShapeDtypeStruct(operands[5].shape, jnp.float32)),
                          vmap_method="sequential")
  got = jax.jit(call)(*operands)
  _check(got, operands)
  np.testing.assert_array_equal(np.asarray(jnp.asarray(operands[0])), operands[0])


def test_vmap():
  """A mapped state and inputs with shared tables, everything mapped, and nested maps."""
  rng = np.random.default_rng(6)
  s, b, h, d = 2, 3, 4, 9
  batches = [_operands(rng, s, b, h, d) for _ in range(4)]
  stacked = tuple(np.stack(parts) for parts in zip(*batches))
  shared = batches[0][2:5]
  f = cpu_kernels.modal_step
  got = jax.jit(jax.vmap(f, (0, 0, None, None, None, 0)))(stacked[0], stacked[1], *shared,
                                                           stacked[5])
  for i in range(4):
    _check([g[i] for g in got], (stacked[0][i], stacked[1][i], *shared, stacked[5][i]))
  got = jax.vmap(f)(*stacked)
  for i in range(4):
    _check([g[i] for g in got], batches[i])
  nested = tuple(np.stack([v] * 2, 1) for v in stacked)  # (4, 2, ...)
  got = jax.jit(jax.vmap(jax.vmap(f)))(*nested)
  chex.assert_shape(got[0], (4, 2, s, b, h, d))
  for i in range(4):
    for j in range(2):
      _check([g[i, j] for g in got], batches[i])


@pytest.mark.parametrize("index,value,error,pattern", [
    (0, np.zeros((2, 3, 4, 5), np.float64), TypeError, r"xr must be float32; got float64"),
    (3, np.zeros((2, 2, 4, 5), np.int32), TypeError, r"residues must be float32; got int32"),
    (5, jnp.zeros((2, 3, 5), jnp.bfloat16), TypeError, r"a must be float32; got bfloat16"),
    (4, [[0.0] * 5] * 2, TypeError, r"total must be an array; got list"),
    (0, np.zeros((2, 3, 20), np.float32), ValueError, r"xr must be \(S, B, H, D\); got shape "
                                                      r"\(2, 3, 20\)"),
    (1, np.zeros((2, 3, 4, 6), np.float32), ValueError,
     r"xi must be \(S, B, H, D\) = \(2, 3, 4, 5\) for xr \(S, B, H, D\) = \(2, 3, 4, 5\); got "
     r"shape \(2, 3, 4, 6\)"),
    (2, np.zeros((2, 4, 5), np.float32), ValueError, r"poles must be \(2, S, H, D\)"),
    (3, np.zeros((2, 2, 1, 5), np.float32), ValueError, r"residues must be \(2, S, H, D\) = "
                                                        r"\(2, 2, 4, 5\)"),
    (4, np.zeros((5,), np.float32), ValueError, r"total must be \(S, D\) = \(2, 5\)"),
    (5, np.zeros((2, 1, 5), np.float32), ValueError, r"a must be \(S, B, D\) = \(2, 3, 5\)"),
])
def test_bad_operands_are_refused(index, value, error, pattern):
  operands = list(_operands(np.random.default_rng(0), 2, 3, 4, 5))
  operands[index] = value
  functions = [cpu_kernels.modal_step, cpu_kernels.modal_step_reference]
  if getattr(value, "dtype", None) != np.float64:  # jit would make a float64 array float32
    functions.append(jax.jit(cpu_kernels.modal_step))
  for f in functions:
    with pytest.raises(error, match=pattern):
      f(*operands)


def test_the_handler_checks_shapes_and_dtypes():
  """The C++ handler refuses operands that do not fit (called past the Python checks)."""
  operands = list(_operands(np.random.default_rng(0), 2, 3, 4, 5))
  state = jax.ShapeDtypeStruct((2, 3, 4, 5), jnp.float32)
  results = (state, state, jax.ShapeDtypeStruct((2, 3, 5), jnp.float32))
  call = jax.ffi.ffi_call(step_lib.TARGET, results, vmap_method="sequential")
  bad = list(operands)
  bad[4] = np.zeros((2, 6), np.float32)
  with pytest.raises(Exception, match=r"lcsm_modal_step: need xr, xi, xr', xi' \(S, B, H, D\), "
                                      r".*got xr \(2, 3, 4, 5\), .*total \(2, 6\)"):
    jax.block_until_ready(call(*bad))
  bad = list(operands)
  bad[0] = np.zeros((2, 3, 20), np.float32)
  with pytest.raises(Exception, match=r"xr must be \(S, B, H, D\); got \(2, 3, 20\)"):
    jax.block_until_ready(call(*bad))
  bad = list(operands)
  bad[2] = operands[2].astype(np.float64)
  with pytest.raises(Exception, match=r"lcsm_modal_step: poles must be float32"):
    with jax.enable_x64(True):
      jax.block_until_ready(call(*bad))
  wrong_y = (state, state, jax.ShapeDtypeStruct((2, 3, 4), jnp.float32))
  with pytest.raises(Exception, match=r"y \(2, 3, 4\)"):
    jax.block_until_ready(jax.ffi.ffi_call(step_lib.TARGET, wrong_y,
                                           vmap_method="sequential")(*operands))


def _export(platforms, disabled=()):
  s, b, h, d = 2, 1, 4, 16
  shapes = [(s, b, h, d), (s, b, h, d), (2, s, h, d), (2, s, h, d), (s, d), (s, b, d)]
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return jax.export.export(jax.jit(cpu_kernels.modal_step), platforms=platforms,
                           disabled_checks=disabled)(*args)


def test_export_for_cpu_holds_the_custom_call():
  check = jax.export.DisabledSafetyCheck.custom_call(step_lib.TARGET)
  module = _export(("cpu",), (check,)).mlir_module()
  assert f"stablehlo.custom_call @{step_lib.TARGET}" in module
  assert "stablehlo.multiply" not in module


def test_export_for_cuda_and_tpu_is_plain_jax():
  exported = _export(("cuda", "tpu"))
  module = exported.mlir_module()
  assert step_lib.TARGET not in module
  assert "stablehlo.multiply" in module
  assert [a.shape for a in exported.out_avals] == [(2, 1, 4, 16), (2, 1, 4, 16), (2, 1, 16)]


def test_disabled_is_the_reference():
  operands = _operands(np.random.default_rng(8), 2, 1, 3, 7)
  # the switch is read when tracing, and jit's trace cache does not know it: fresh functions
  with cpu_kernels.disabled():
    hlo = jax.jit(lambda *o: cpu_kernels.modal_step(*o)).lower(*operands).as_text()
    _check(cpu_kernels.modal_step(*operands), operands)
  assert step_lib.TARGET not in hlo
  hlo = jax.jit(lambda *o: cpu_kernels.modal_step(*o)).lower(*operands).as_text()
  assert step_lib.TARGET in hlo


def test_unavailable_kernel_falls_back_with_a_warning(monkeypatch):
  monkeypatch.setattr(step_lib.KERNEL, "state", {"ok": False, "reason": "BuildError: no compiler"})
  monkeypatch.setattr(step_lib, "_warned", [])
  assert not step_lib.available()
  assert step_lib.unavailable_reason() == "BuildError: no compiler"
  operands = _operands(np.random.default_rng(9), 2, 3, 2, 5)
  with pytest.warns(RuntimeWarning, match=r"modal CPU kernel is unavailable: BuildError: no "
                                          r"compiler"):
    hlo = jax.jit(lambda *o: cpu_kernels.modal_step(*o)).lower(*operands).as_text()
  assert step_lib.TARGET not in hlo
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once per process
    _check(cpu_kernels.modal_step(*operands), operands)


def _while_bodies(hlo: str) -> list[str]:
  """The text of every while loop's body computation in an HLO module."""
  bodies = []
  for name in re.findall(r"\bwhile\([^\n]*?body=%?([\w.\-]+)", hlo):
    match = re.search(r"^%?" + re.escape(name) + r" .*?^}", hlo, re.M | re.S)
    assert match, name
    bodies.append(match.group(0))
  return bodies


def test_strategy_token_loop_updates_the_state_in_place():
  """The modal strategy's update in `token_loop` (the engine's loop): one custom call per
  token, no copy of the state planes in the loop body, and the reference's values."""
  s, b, h, d = 3, 2, 4, 32
  rng = np.random.default_rng(10)
  poles = 0.9 * np.exp(1j * rng.uniform(-np.pi, np.pi, (s, d, h)))
  residues = rng.standard_normal((s, d, h)) + 1j * rng.standard_normal((s, d, h))
  aux = modal.ModalTables(poles, residues, None, None, None, None)  # poles, residues read
  strategy = modal.Modal()
  tables = strategy.prepare(jnp.zeros((1, s, d), jnp.float32), aux)
  state = modal.modal_state(jnp.zeros((s, b, d, h), jnp.complex64), tables.residues)
  drive = jnp.asarray(rng.standard_normal((s, b, d)), jnp.float32)

  def run(tables, state, count):  # traced anew for each jax.jit(run) below
    # the pending outputs are read every token; the inputs do not feed back (no amplification)
    step = lambda rest, pending, r: (rest + pending, drive * jnp.cos(0.1 * r))
    return base.token_loop(step, lambda st, r: strategy.pending(tables, st, r),
                           lambda st, r, a: strategy.update(tables, st, r, a, 0), state,
                           jnp.zeros((s, b, d), jnp.float32), 0, count)

  hlo = jax.jit(run, static_argnums=2).lower(tables, state, 50).compile().as_text()
  bodies = [body for body in _while_bodies(hlo) if "lcsm_modal_step" in body]
  assert len(bodies) == 1, hlo
  assert len(re.findall(r"custom-call\(", bodies[0])) == 1
  assert not re.search(rf"f32\[{s},{b},{h},{d}\]\S* copy\(", bodies[0]), bodies[0]
  got = jax.jit(run, static_argnums=2)(tables, state, 50)
  with cpu_kernels.disabled():
    want = jax.jit(lambda *args: run(*args), static_argnums=2)(tables, state, 50)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_shard_map(check_vma):
  """Within jax.shard_map the custom call runs on each device's shards, its results typed as
  varying like the reference's (on this process's one device: a 1 x 1 mesh)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  operands = _operands(np.random.default_rng(12), 2, 3, 4, 16)
  state, rows, table = P(None, "data", None, "model"), P(None, "data", "model"), P(None, None,
                                                                                   None, "model")
  specs = (state, state, table, table, P(None, "model"), rows)
  placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(operands, specs)]
  mapped = jax.jit(jax.shard_map(lambda *o: cpu_kernels.modal_step(*o), mesh=mesh,
                                 in_specs=specs, out_specs=(state, state, rows),
                                 check_vma=check_vma))
  assert step_lib.TARGET in mapped.lower(*placed).as_text()
  _check(mapped(*placed), operands)
