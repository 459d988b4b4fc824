"""The Pallas Toeplitz-block kernels, run in interpret mode on the CPU, against their plain-JAX
references and an independent float64 NumPy direct sum.

Every kernel run writes into a NaN-poisoned output buffer (`poison_output=True`: a NaN-filled
array aliased to the kernel's output), so an output element the kernel fails to write stays NaN
and fails `assert_block_close`; `test_poisoning_detects_unwritten_output` checks that this
detection works by running deliberately broken kernels.

Tolerances. Both kernels accumulate products in float32. With the float64 reference computed
from the very values the kernel saw (bfloat16 inputs are upcast exactly), every product of two
bfloat16 numbers is exact in float32 (8 + 8 significant bits <= 24), and a float32 product
carries a relative error <= 2^-24; summing U terms in float32 adds at most (U - 1) roundings.
So elementwise |out - exact| <= (U + 1) * 2^-24 * sum_k |inputs[k]| * |taps[U + j - k]|
for float32 and bfloat16 alike; we allow 2x that (`_TOL_ULPS`). The bfloat16 rounding of the
inputs themselves is not an error of the kernel, so it is not in the budget.
"""

from __future__ import annotations

import functools
import importlib
import os

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import fft_block_reference
from pallas_kernels import toeplitz_block
from pallas_kernels import toeplitz_block_mxu
from pallas_kernels import toeplitz_block_reference
from pallas_kernels import toeplitz_block_tiled_reference

# The kernel modules (their names are shadowed by the functions in the package namespace).
direct_lib = importlib.import_module("pallas_kernels.toeplitz_block")
mxu_lib = importlib.import_module("pallas_kernels.toeplitz_block_mxu")

# On a TPU or GPU host, LCSM_PALLAS_COMPILED=1 runs the same tests with the compiled kernels.
INTERPRET = None if os.environ.get("LCSM_PALLAS_COMPILED") == "1" else True
_ON_CPU = jax.default_backend() == "cpu"

_EPS32 = 2.0 ** -24
_TOL_ULPS = 2.0


def numpy_direct_sum(inputs, taps):
  """float64: out[j, s, b, d] = sum_k inputs[k, s, b, d] * taps[U + j - k, s, d], one shifted
  product per k (all j at once)."""
  x = np.asarray(inputs, np.float64)
  w = np.asarray(taps, np.float64)
  size = x.shape[0]
  out = np.zeros(x.shape, np.float64)
  for k in range(size):
    out += x[k][None] * w[size - k:2 * size - k][:, :, None, :]
  return out


def assert_block_close(out, inputs, taps):
  """Shape, dtype, no unwritten (NaN) element, and the float32 error budget of the docstring."""
  out = np.asarray(out)
  chex.assert_shape(out, inputs.shape)
  assert out.dtype == np.float32, out.dtype
  unwritten = np.isnan(out)
  assert not unwritten.any(), f"{unwritten.sum()} output elements were never written (NaN)"
  exact = numpy_direct_sum(inputs, taps)
  scale = numpy_direct_sum(np.abs(np.asarray(inputs, np.float64)),
                           np.abs(np.asarray(taps, np.float64)))
  size = inputs.shape[0]
  bound = _TOL_ULPS * (size + 1) * _EPS32 * scale
  err = np.abs(out.astype(np.float64) - exact)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (
      f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} (U={size})")


def random_block(seed, size, streams, batch, channels, dtype):
  rng = np.random.default_rng(seed)
  inputs = rng.standard_normal((size, streams, batch, channels)).astype(np.float32)
  taps = rng.standard_normal((2 * size, streams, channels)).astype(np.float32)
  taps /= np.sqrt(np.arange(1, 2 * size + 1))[:, None, None]  # a decaying filter, like Hyena's
  return jnp.asarray(inputs, dtype), jnp.asarray(taps, dtype)


# (U, S, B, D): every U the schedule uses in tests; odd S and B; D never a multiple of 128 (the
# wrapper pads channels) except 256; D = 130 also spans two channel tiles with block_d = 128.
SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 1, 5),
    (4, 2, 3, 130),
    (16, 1, 2, 7),
    (64, 3, 1, 3),
]
DTYPES = [jnp.float32, jnp.bfloat16]


def _cases():
  for i, shape in enumerate(SHAPES):
    for j, dtype in enumerate(DTYPES):
      yield pytest.param(shape, dtype, bool((i + j) % 2),
                         id=f"U{shape[0]}-S{shape[1]}-B{shape[2]}-D{shape[3]}-"
                            f"{jnp.dtype(dtype).name}-{'jit' if (i + j) % 2 else 'eager'}")


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("shape,dtype,use_jit", list(_cases()))
def test_direct_kernel(shape, dtype, use_jit):
  """toeplitz_block (one pallas_call, default body: "static" here) vs its reference and the
  NumPy direct sum."""
  inputs, taps = random_block(0, *shape, dtype)
  block_d = 128 if shape[3] > 128 else None  # D = 130: two channel tiles
  run = _maybe_jit(functools.partial(toeplitz_block, interpret=INTERPRET, block_d=block_d,
                                     poison_output=True), use_jit)
  out = run(inputs, taps)
  assert_block_close(out, inputs, taps)
  ref = toeplitz_block_reference(inputs, taps)
  assert_block_close(ref, inputs, taps)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("body", ["aligned", "dynamic", "rows"])
@pytest.mark.parametrize("shape,dtype,use_jit,block_t", [
    pytest.param((4, 2, 3, 5), jnp.float32, True, 2, id="U4-f32-jit-Tj2"),
    pytest.param((16, 1, 2, 130), jnp.bfloat16, False, 4, id="U16-bf16-eager-Tj4"),
    pytest.param((32, 1, 1, 3), jnp.float32, False, 8, id="U32-f32-eager-Tj8"),
])
def test_direct_kernel_bodies(shape, dtype, use_jit, block_t, body):
  """The loop bodies for output-time tiles smaller than U (grid axis 3): TPU's aligned groups
  (g = 8 rows for f32, 16 for bf16, U for U < g), Triton's dynamic offsets, Mosaic GPU's rows."""
  inputs, taps = random_block(1, *shape, dtype)
  run = _maybe_jit(functools.partial(toeplitz_block, interpret=INTERPRET, block_t=block_t,
                                     block_d=128, poison_output=True, _body=body), use_jit)
  assert_block_close(run(inputs, taps), inputs, taps)


@pytest.mark.parametrize("shape,dtype,use_jit", list(_cases()))
def test_mxu_kernel(shape, dtype, use_jit):
  """toeplitz_block_mxu (blocked Toeplitz matmuls) vs its tiled reference and the NumPy sum.

  Small time tiles (T = U/4, U/2 for U = 64) so that several tiles, both signs of delta and
  the stacking of input tiles are exercised at interpret-mode sizes.
  """
  inputs, taps = random_block(2, *shape, dtype)
  size = shape[0]
  tile = max(1, size // 4) if size < 64 else size // 2  # (interpret compile time grows with tiles)
  run = _maybe_jit(functools.partial(toeplitz_block_mxu, interpret=INTERPRET, block_t=tile,
                                     block_d=2, poison_output=True), use_jit)
  out = run(inputs, taps)
  assert_block_close(out, inputs, taps)
  ref = toeplitz_block_tiled_reference(inputs, taps, tile)
  assert_block_close(ref, inputs, taps)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_mxu_tile_size():
  assert mxu_lib.tile_size(1) == 1
  assert mxu_lib.tile_size(64) == 64
  assert mxu_lib.tile_size(128) == 128
  assert mxu_lib.tile_size(1024) == 128
  assert mxu_lib.tile_size(4096) == 256  # at most 16 tiles
  assert mxu_lib.tile_size(4096, block_t=256, max_tiles=64) == 256


@pytest.mark.parametrize("size", [1, 4, 64, 256])
def test_references_agree_with_numpy(size):
  """The direct, tiled and FFT references against the float64 NumPy sum (no Pallas)."""
  inputs, taps = random_block(3, size, 2, 3, 5, jnp.float32)
  assert_block_close(toeplitz_block_reference(inputs, taps), inputs, taps)
  assert_block_close(toeplitz_block_tiled_reference(inputs, taps, max(1, size // 4)),
                     inputs, taps)
  # The FFT path's error is not elementwise: it is ~ eps * log2(2U) * ||x|| * ||w||.
  exact = numpy_direct_sum(inputs, taps)
  fft = np.asarray(fft_block_reference(inputs, taps), np.float64)
  norm = np.sqrt((np.asarray(inputs, np.float64) ** 2).sum(0, keepdims=True)
                 * (np.asarray(taps, np.float64) ** 2).sum(0)[None, :, None, :])
  assert np.all(np.abs(fft - exact) <= 16 * _EPS32 * (np.log2(2 * size) + 1) * norm)


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(size_log2=st.integers(0, 5), streams=st.integers(1, 3),
                  batch=st.integers(1, 3), channels=st.integers(1, 9),
                  seed=st.integers(0, 2 ** 16))
def test_reference_random_shapes(size_log2, streams, batch, channels, seed):
  size = 2 ** size_log2
  inputs, taps = random_block(seed, size, streams, batch, channels, jnp.float32)
  assert_block_close(toeplitz_block_reference(inputs, taps), inputs, taps)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(size_log2=st.integers(0, 4), streams=st.integers(1, 3),
                  batch=st.integers(1, 3), channels=st.integers(1, 9),
                  seed=st.integers(0, 2 ** 16))
def test_direct_kernel_random_shapes(size_log2, streams, batch, channels, seed):
  inputs, taps = random_block(seed, 2 ** size_log2, streams, batch, channels, jnp.float32)
  out = toeplitz_block(inputs, taps, interpret=INTERPRET, poison_output=True)
  assert_block_close(out, inputs, taps)


@pytest.mark.skipif(not _ON_CPU, reason="checks the CPU default")
def test_interpret_none_runs_on_cpu():
  """interpret=None (the engine's call) resolves to the interpreter on this CPU host."""
  inputs, taps = random_block(4, 4, 2, 1, 3, jnp.float32)
  assert_block_close(toeplitz_block(inputs, taps), inputs, taps)
  assert_block_close(toeplitz_block_mxu(inputs, taps, block_t=2), inputs, taps)


@pytest.mark.skipif(not _ON_CPU, reason="checks the CPU default")
def test_interpret_false_refuses_cpu():
  inputs, taps = random_block(4, 2, 1, 1, 3, jnp.float32)
  with pytest.raises(Exception, match="cpu|CPU"):
    toeplitz_block(inputs, taps, interpret=False)


def test_rejects_bad_shapes():
  inputs, taps = random_block(5, 4, 1, 1, 3, jnp.float32)
  with pytest.raises(ValueError, match="taps must be"):
    toeplitz_block(inputs, taps[:7])
  with pytest.raises(ValueError, match="power of two"):
    toeplitz_block(inputs[:3], taps[:6])
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    toeplitz_block_reference(inputs.astype(jnp.float16), taps)


def _first_slice_only(kernel, n_views):
  """A broken kernel: `kernel` run on views of its first `n_views` refs and its output ref that
  keep only index 0 of their leading axis, so the rest of every output block is never written."""
  def broken(*refs, **kwargs):
    first = lambda ref: ref.at[pl.ds(0, 1)]
    views = [first(r) for r in refs[:n_views]] + list(refs[n_views:-1]) + [first(refs[-1])]
    kernel(*views, **kwargs)
  return broken


def test_poisoning_detects_unwritten_output(monkeypatch):
  """Kernels that leave part of every output block unwritten produce NaNs the checks catch."""
  inputs, taps = random_block(6, 4, 1, 1, 130, jnp.float32)
  # The direct kernel writing only the first row of every output-time tile (block_t = 2).
  monkeypatch.setattr(direct_lib, "_aligned_kernel",
                      _first_slice_only(direct_lib._aligned_kernel, 0))
  out = np.asarray(toeplitz_block(inputs, taps, interpret=INTERPRET, block_t=2, block_d=128,
                                  poison_output=True))
  assert np.isnan(out[1::2]).all() and not np.isnan(out[0::2]).any()
  with pytest.raises(AssertionError, match="never written"):
    assert_block_close(out, inputs, taps)
  # The MXU kernel computing only the first channel of every block of 8 channels.
  monkeypatch.setattr(mxu_lib, "_mxu_kernel", _first_slice_only(mxu_lib._mxu_kernel, 2))
  out = np.asarray(toeplitz_block_mxu(inputs, taps, interpret=INTERPRET, block_t=2, block_d=8,
                                      poison_output=True))
  written = np.zeros(130, bool)
  written[::8] = True
  assert np.isnan(out[..., ~written]).all() and not np.isnan(out[..., written]).any()
  with pytest.raises(AssertionError, match="never written"):
    assert_block_close(out, inputs, taps)
