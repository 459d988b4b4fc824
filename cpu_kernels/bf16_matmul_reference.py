"""Plain-JAX reference for the bfloat16-weight product of `bf16_matmul.py`.

Contract:

  x: (..., K) float32      activations; leading dims are batch rows
  w: (K, N)   bfloat16     weights, row-major
  out: (..., N) float32,   out[..., n] = sum_k x[..., k] * float32(w[k, n]),
                           products accumulated in float32 (x is not rounded)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def check_operands(x, w) -> tuple[int, int]:
  """Validates the contract's shapes and dtypes and returns (K, N)."""
  for name, a in (("x", x), ("w", w)):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise TypeError(f"bf16_matmul: {name} must be an array; got {type(a).__name__}.")
  if jnp.dtype(x.dtype) != jnp.float32:
    raise TypeError(f"bf16_matmul: x must be float32; got {jnp.dtype(x.dtype)}.")
  if jnp.dtype(w.dtype) != jnp.bfloat16:
    raise TypeError(f"bf16_matmul: w must be bfloat16; got {jnp.dtype(w.dtype)}.")
  if len(w.shape) != 2:
    raise ValueError(f"bf16_matmul: w must be (K, N); got shape {tuple(w.shape)}.")
  if len(x.shape) < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"bf16_matmul: x must be (..., K) with K = {w.shape[0]} (w's rows); got "
                     f"shape {tuple(x.shape)}.")
  return int(w.shape[0]), int(w.shape[1])


def bf16_matmul_reference(x: Array, w: Array) -> Array:
  """x (..., K) float32 @ w (K, N) bfloat16 -> (..., N) float32 by one XLA dot_general."""
  check_operands(x, w)
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
