"""Plain-JAX reference for the blocked-Toeplitz (matrix-unit) form of the Toeplitz block.

Same contract as `toeplitz_block_reference` (inputs (U, S, B, D), taps (2U, S, D), float32 out),
computed the way `toeplitz_block_mxu` splits it: with U = m * T, output time tile p and input
time tile q interact through the T x T Toeplitz tile

  T_delta[jj, kk] = taps[U + delta * T + jj - kk],   delta = p - q in [-(m-1), m-1],

which depends only on delta, so out[p] = sum_q T_{p-q} @ inputs[q]. Here the 2m - 1 tiles are
gathered explicitly and contracted tile pair by tile pair in one einsum (float32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.toeplitz_block_reference import check_block_shapes

Array = jax.Array


def toeplitz_tiles(taps: Array, size: int, tile: int) -> Array:
  """(2U, ...) taps -> (2m - 1, T, T, ...) tiles T_delta, delta = -(m-1) .. m-1."""
  if size % tile:
    raise ValueError(f"the tile {tile} must divide U = {size}.")
  m = size // tile
  delta = jnp.arange(-(m - 1), m)[:, None, None]
  jj = jnp.arange(tile)[None, :, None]
  kk = jnp.arange(tile)[None, None, :]
  return taps[size + delta * tile + jj - kk]


def toeplitz_block_tiled_reference(inputs: Array, taps: Array, tile: int) -> Array:
  """The block as (U/T)^2 products of T x T Toeplitz tiles: (U, S, B, D) -> (U, S, B, D) f32."""
  size, streams, batch, channels = check_block_shapes(inputs, taps)
  m = size // tile
  tiles = toeplitz_tiles(taps.astype(jnp.float32), size, tile)      # (2m-1, T, T, S, D)
  pair = jnp.arange(m)[:, None] - jnp.arange(m)[None, :] + (m - 1)   # (p, q) -> delta index
  x = inputs.astype(jnp.float32).reshape(m, tile, streams, batch, channels)
  out = jnp.einsum("pqjksd,qksbd->pjsbd", tiles[pair], x,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return out.reshape(size, streams, batch, channels)
