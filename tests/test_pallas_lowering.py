"""The Pallas kernels lower for TPU (Mosaic), for GPU through Triton and through Mosaic GPU.

No accelerator is needed: `jax.export.export(..., platforms=[...])` lowers on this CPU host.
What this proves, per backend: Pallas accepted the kernel (grid, block shapes, every primitive)
and emitted the backend's kernel IR inside a custom call, whose target each test checks so that an
interpreter fallback cannot pass for a lowering. It does not prove the backend's own compiler
(Mosaic's layout passes in libtpu, Triton's PTX pipeline in XLA:GPU) accepts that IR, nor
anything about speed: that needs the device (experiments/pallas_crossover.py).

Known failures are listed in `EXPECTED_FAILURES` with the message the lowering raises; such a
case is an xfail carrying the concrete exception text, and a case that lowers although it is
listed fails (strict), so the table stays true.
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import toeplitz_block
from pallas_kernels import toeplitz_block_mxu

TRITON_TARGET = "__gpu$xla.gpu.triton"

ROUTES = {
    # route: (platform, gpu_backend, disabled safety checks, custom call target in the module)
    "tpu": ("tpu", "triton", (), "tpu_custom_call"),
    "triton": ("cuda", "triton", (jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET),),
               TRITON_TARGET),
    "mosaic_gpu": ("cuda", "mosaic_gpu", (), "mosaic_gpu"),
}

KERNELS = {"direct": toeplitz_block, "mxu": toeplitz_block_mxu}

# (kernel, route, predicate on U) -> regex of the lowering error.
EXPECTED_FAILURES = [
    ("mxu", "triton", lambda u: True,
     r"Unimplemented primitive in Pallas Triton lowering: roll"),
    ("mxu", "mosaic_gpu", lambda u: u >= 128,
     r"Unimplemented primitive in Pallas Mosaic GPU lowering: roll"),
    ("mxu", "mosaic_gpu", lambda u: u < 128,  # fails on the taps window before reaching roll
     r"must have a number of elements that is a multiple of 128"),
    ("direct", "mosaic_gpu", lambda u: u >= 128,  # f32: shared memory; bf16: the copy size
     r"exceeds available shared memory|Async copies only support copying <=256 elements"),
]

ALL = tuple(ROUTES)
# (kernel, (U, S, B, D), routes): several streams and batch rows, D not a multiple of 128 too.
# The MXU kernel is TPU-only (no rotation on GPU backends): two sizes show the GPU errors.
CASES = [
    ("direct", (1, 4, 3, 200), ALL),
    ("direct", (16, 2, 1, 256), ALL),
    ("direct", (64, 8, 2, 512), ALL),
    ("direct", (256, 2, 1, 128), ALL),
    ("mxu", (8, 2, 1, 64), ALL),
    ("mxu", (128, 2, 3, 256), ALL),
    ("mxu", (1024, 4, 1, 200), ("tpu",)),
    ("mxu", (4096, 2, 1, 128), ("tpu",)),
]
PARAMS = [pytest.param(kernel, shape, route, id=f"{kernel}-U{shape[0]}-S{shape[1]}-B{shape[2]}-"
                       f"D{shape[3]}-{route}")
          for kernel, shape, routes in CASES for route in routes]


def _expected_failure(kernel, route, size):
  for k, r, applies, pattern in EXPECTED_FAILURES:
    if k == kernel and r == route and applies(size):
      return pattern
  return None


def _export(kernel, route, shape, dtype):
  platform, gpu_backend, disabled, _ = ROUTES[route]
  size, streams, batch, channels = shape
  args = (jax.ShapeDtypeStruct((size, streams, batch, channels), dtype),
          jax.ShapeDtypeStruct((2 * size, streams, channels), dtype))
  fn = functools.partial(KERNELS[kernel], gpu_backend=gpu_backend)  # interpret=None
  with warnings.catch_warnings():  # Mosaic GPU through pl.pallas_call is deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel,shape,route", PARAMS)
def test_lowers(kernel, shape, route, dtype):
  expected = _expected_failure(kernel, route, shape[0])
  try:
    exported = _export(kernel, route, shape, dtype)
  except Exception as e:  # pylint: disable=broad-except
    message = f"{type(e).__name__}: {e}"
    if expected is not None and re.search(expected, message):
      pytest.xfail(f"{kernel} does not lower via {route}: {message[:400]}")
    raise
  if expected is not None:
    pytest.fail(f"{kernel} lowered via {route} although EXPECTED_FAILURES says it raises "
                f"{expected!r}: update the table.")
  module = exported.mlir_module()
  target = ROUTES[route][3]
  assert target in module, f"no {target} custom call in the exported module"
  assert exported.platforms == (ROUTES[route][0],)
  assert exported.out_avals[0].shape == shape and exported.out_avals[0].dtype == jnp.float32


def test_tpu_lowering_is_one_kernel_per_call():
  """The whole batched block is one Mosaic kernel (one custom call), not one per stream."""
  module = _export("direct", "tpu", (16, 6, 3, 256), jnp.float32).mlir_module()
  assert module.count("stablehlo.custom_call @tpu_custom_call") == 1
  module = _export("mxu", "tpu", (256, 6, 3, 256), jnp.float32).mlir_module()
  assert module.count("stablehlo.custom_call @tpu_custom_call") == 1


def test_tpu_rejects_misaligned_channel_tile():
  """The TPU block-shape rule is enforced at lowering: a 64-lane channel tile is refused."""
  args = (jax.ShapeDtypeStruct((4, 2, 2, 256), jnp.float32),
          jax.ShapeDtypeStruct((8, 2, 256), jnp.float32))
  fn = functools.partial(toeplitz_block, block_d=64)
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
