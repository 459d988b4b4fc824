"""float32 activations times bfloat16 weights on CPU through an XLA FFI custom call.

Contract (the same as `bf16_matmul_reference.py`):

  bf16_matmul(x, w) -> out
    x:   (..., K) float32   activations; leading dims are flattened to B rows
    w:   (K, N)   bfloat16  weights, row-major
    out: (..., N) float32,  out[..., n] = sum_k x[..., k] * float32(w[k, n]), accumulated in
                            float32 (k in increasing order on CPU)

XLA:CPU has no bfloat16 dot: it converts a bfloat16 operand to a float32 copy and reads that,
so a memory-bound matrix-vector product reads 4 bytes per weight. On CPU this function runs
`bf16_matmul.cc` instead, which reads each weight as stored (2 bytes) once per call for all B
rows. Off CPU (`jax.lax.platform_dependent`: GPU, TPU, or `jax.export` for those platforms) it
is the reference's `dot_general`, so a program using it still lowers everywhere.

The C++ source is compiled on first use with the system C++ compiler (see `_build.py`) and
registered as the FFI target `lcsm_bf16_matmul`. `available()` says whether that worked; if
not, `unavailable_reason()` says why and `bf16_matmul` raises RuntimeError.

Under `jax.vmap` the custom call is batched with `vmap_method="broadcast_all"`: every operand
gets the mapped dims in front (an unmapped `w` is broadcast, i.e. copied, per mapped index)
and the kernel loops over them. The custom call has no derivative rules, and XLA's SPMD
partitioner does not split it: on a device mesh, sharded operands are gathered first.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from cpu_kernels import _build
from cpu_kernels.bf16_matmul_reference import bf16_matmul_reference
from cpu_kernels.bf16_matmul_reference import check_operands

Array = jax.Array

TARGET = "lcsm_bf16_matmul"
SYMBOL = "LcsmBf16Matmul"
SOURCE = pathlib.Path(__file__).with_name("bf16_matmul.cc")

KERNEL = _build.Kernel(SOURCE, TARGET, SYMBOL)


def available() -> bool:
  """Whether the CPU kernel is built and registered (builds it on the first call)."""
  return KERNEL.available()


def unavailable_reason() -> str:
  """Why `available()` is False ('' when it is True)."""
  return KERNEL.unavailable_reason()


def library_path() -> pathlib.Path | None:
  """The loaded shared library (None when unavailable)."""
  return KERNEL.library_path()


def _ffi_rows(x: Array, w: Array) -> Array:
  """(B, K) float32 @ (K, N) bfloat16 -> (B, N) float32 by the custom call."""
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(x, w)


def bf16_matmul(x: Array, w: Array) -> Array:
  """x (..., K) float32 @ w (K, N) bfloat16 -> (..., N) float32 (see the module docstring).

  Raises TypeError / ValueError for wrong dtypes / shapes, RuntimeError if the CPU kernel is
  unavailable (`unavailable_reason()`)."""
  depth, width = check_operands(x, w)
  if not available():
    raise RuntimeError(f"bf16_matmul: the CPU kernel is unavailable: {unavailable_reason()}")
  lead = tuple(x.shape[:-1])
  rows = jnp.reshape(x, (-1, depth))
  out = jax.lax.platform_dependent(rows, w, cpu=_ffi_rows, default=bf16_matmul_reference)
  return jnp.reshape(out, lead + (width,))
