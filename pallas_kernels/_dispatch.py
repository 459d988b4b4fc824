"""Choosing, per platform, how a Pallas kernel runs: interpreted on CPU, compiled elsewhere.

`interpret=None` must mean "interpret on CPU, compile otherwise" also when the caller is not on
the platform it lowers for (`jax.export` for TPU from a CPU host): the choice is therefore made
at lowering time with `lax.platform_dependent`, one branch per platform, not from
`jax.default_backend()` at trace time (which would silently export the CPU interpreter).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax

GpuBackend = Literal["triton", "mosaic_gpu"]
GPU_BACKENDS = ("triton", "mosaic_gpu")

# build(target) -> a function of the kernel's array arguments. target is one of
# "interpret", "tpu", "triton", "mosaic_gpu".
Builder = Callable[[str], Callable[..., Any]]


def dispatch(build: Builder, interpret: bool | None, gpu_backend: GpuBackend) -> Callable[..., Any]:
  """The kernel for `interpret` (True: always interpret; False: always compiled; None: interpret
  on CPU only), compiled on GPU through `gpu_backend`."""
  if gpu_backend not in GPU_BACKENDS:
    raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}; got {gpu_backend!r}.")
  if interpret:
    return build("interpret")
  branches = dict(tpu=build("tpu"), cuda=build(gpu_backend))
  if gpu_backend == "triton":  # Mosaic GPU does not run on ROCm; Triton does.
    branches["rocm"] = branches["cuda"]
  if interpret is None:
    branches["cpu"] = build("interpret")

  def run(*args):
    return jax.lax.platform_dependent(*args, **branches)

  return run
