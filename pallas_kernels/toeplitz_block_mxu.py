"""Pallas kernel for the Toeplitz block as blocked Toeplitz matrix products (for TPU matrix units).

Same contract as `toeplitz_block` (inputs (U, S, B, D), taps (2U, S, D), float32 out (U, S, B, D),
out[j] = sum_k inputs[k] * taps[U + j - k] per stream and channel), for large U, where the O(U^2)
direct sum should run on the matrix unit (MXU) instead of the vector unit, without an FFT.

Each channel's block is a U x U Toeplitz matrix-vector product per batch row. Splitting U = m * T,
output tile p and input tile q interact through the T x T Toeplitz tile

  T_delta[jj, kk] = taps[U + delta * T + jj - kk],   delta = p - q,

which depends only on delta. So per channel the kernel builds each of the 2m - 1 tiles once, in
VMEM, and multiplies it with all the input tiles it meets, stacked: for delta >= 0,

  out[delta:m] += inputs[0:m-delta] @ T_delta^T      (an (m - delta, T) x (T, T) matmul per row)

(and symmetrically for delta < 0). Building a tile costs O(T^2) vector work, reused by
(m - |delta|) * B rows of matmul; total matmul work is U^2 * B per channel, tile building about
4 * U * T. A tile is built from the 2T taps it needs with one strided lane rotation
(`pltpu.roll(..., stride=1, stride_axis=0)`: row kk rotated by T + kk), Mosaic TPU's native way
to make a Toeplitz matrix; the kernel is therefore TPU-only when compiled (Triton and Mosaic GPU
have no rotation; see the lowering tests for the exact errors) and runs anywhere in interpret mode.

Layout: the wrapper transposes inputs to (S, D, B, m, T) and taps to (S, D, 2U) (channels leading,
time along lanes), and the output back; these copies are O(U * S * B * D), small next to the
O(U^2) work this kernel is meant for. Grid: (stream, block of Dc channels), both parallel.

Precision: float32 operands use `Precision.HIGHEST` (full float32 products on the MXU);
bfloat16 operands (both) stay bfloat16 in the matmul (exact products) with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch
from pallas_kernels.toeplitz_block_reference import check_block_shapes

Array = jax.Array


def _roll_toeplitz_tile(window: Array, tile: int) -> Array:
  """(1, 2T) taps window -> (T, T) with t[kk, jj] = window[T + jj - kk] (one strided rotation)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  rows = jnp.broadcast_to(window, (tile, 2 * tile))
  # Row kk rotated right by T + kk: rows[kk, n] -> window[(n - T - kk) mod 2T], which for
  # n = jj in [0, T) is window[T + jj - kk] (no wrap-around: T + jj - kk lies in [1, 2T - 1]).
  return pltpu.roll(rows, tile, 1, stride=1, stride_axis=0)[:, :tile]


def _mxu_kernel(x_ref, w_ref, *refs, dot_dtype, precision):
  """x_ref (Dc, B, m, T), w_ref (Dc, 2U), o_ref (Dc, B, m, T) float32."""
  o_ref = refs[-1]
  n_channels, batch, m, tile = x_ref.shape
  # delta = 0 first: its product covers every output row and is stored (not added), so the
  # output needs no zero-fill and an element the kernel never writes keeps its old value.
  deltas = [0] + [d for k in range(1, m) for d in (k, -k)]

  def channel(c, carry):
    for delta in deltas:  # static: every slice below has a static size
      base = (m - 1 + delta) * tile   # taps[U + delta*T - T : U + delta*T + T]
      window = w_ref[pl.ds(c, 1), pl.ds(base, 2 * tile)].astype(jnp.float32)
      t = _roll_toeplitz_tile(window, tile).astype(dot_dtype)  # (T_k, T_j)
      rows, src, dst = m - abs(delta), max(0, -delta), max(0, delta)

      def batch_row(b, carry, t=t, rows=rows, src=src, dst=dst, delta=delta):
        lhs = x_ref[c, b, pl.ds(src, rows), :].astype(dot_dtype)  # input tiles q
        term = jnp.dot(lhs, t, precision=precision, preferred_element_type=jnp.float32)
        if delta == 0:
          o_ref[c, b, :, :] = term
        else:
          o_ref[c, b, pl.ds(dst, rows), :] += term                # output tiles q + delta
        return carry

      jax.lax.fori_loop(0, batch, batch_row, 0)
    return carry

  jax.lax.fori_loop(0, n_channels, channel, 0)


def _compiler_params(target: str):
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  if target == "triton":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=1)
  if target == "mosaic_gpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.CompilerParams()
  return None


def tile_size(size: int, block_t: int = 128, max_tiles: int = 16) -> int:
  """The time tile T used for block size U: min(U, block_t), grown so that U / T <= max_tiles."""
  tile = min(size, block_t)
  return max(tile, size // max_tiles)


def _mxu_call(inputs: Array, taps: Array, poison: Array | None, *, target: str, tile: int,
              block_d: int) -> Array:
  size, streams, batch, channels = inputs.shape
  m = size // tile
  n_channels = channels if channels <= block_d else block_d
  n_blocks = -(-channels // n_channels)
  padded = n_blocks * n_channels
  xt = jnp.transpose(inputs, (1, 3, 2, 0))  # (S, D, B, U)
  wt = jnp.transpose(taps, (1, 2, 0))       # (S, D, 2U)
  if padded != channels:
    xt = jnp.pad(xt, ((0, 0), (0, padded - channels), (0, 0), (0, 0)))
    wt = jnp.pad(wt, ((0, 0), (0, padded - channels), (0, 0)))
  xt = xt.reshape(streams, padded, batch, m, tile)

  dot_dtype = jnp.promote_types(inputs.dtype, taps.dtype)
  precision = jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
  kernel = functools.partial(_mxu_kernel, dot_dtype=dot_dtype, precision=precision)

  sq = pl.squeezed
  x_spec = pl.BlockSpec((sq, n_channels, batch, m, tile), lambda s, c: (s, c, 0, 0, 0))
  w_spec = pl.BlockSpec((sq, n_channels, 2 * size), lambda s, c: (s, c, 0))
  out_shape = jax.ShapeDtypeStruct((streams, padded, batch, m, tile), jnp.float32)
  args, in_specs, aliases = [xt, wt], [x_spec, w_spec], {}
  if poison is not None:  # start from a NaN-filled output buffer: unwritten elements stay NaN
    poison = jnp.transpose(poison, (1, 3, 2, 0))
    poison = jnp.pad(poison, ((0, 0), (0, padded - channels), (0, 0), (0, 0)),
                     constant_values=jnp.nan)
    args.append(poison.reshape(out_shape.shape))
    in_specs.append(x_spec)
    aliases = {2: 0}
  out = pl.pallas_call(
      kernel,
      grid=(streams, n_blocks),
      in_specs=in_specs,
      out_specs=x_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(target),
      interpret=(target == "interpret"),
      name="toeplitz_block_mxu",
  )(*args)
  out = out.reshape(streams, padded, batch, size)[:, :channels]
  return jnp.transpose(out, (3, 0, 2, 1))  # (U, S, B, D)


def toeplitz_block_mxu(inputs: Array, taps: Array, *, interpret: bool | None = None,
                       block_t: int = 128, block_d: int = 8, max_tiles: int = 16,
                       gpu_backend: _dispatch.GpuBackend = "triton",
                       poison_output: bool = False) -> Array:
  """The Toeplitz block of all streams, batch rows and channels as blocked Toeplitz matmuls.

  Args:
    inputs: (U, S, B, D) float32 or bfloat16; U a power of two.
    taps: (2U, S, D) float32 or bfloat16.
    interpret: True: Pallas interpreter on any platform; False: compiled; None: interpreted on
      CPU, compiled elsewhere (chosen at lowering). Compiled, only TPU lowers (see module doc).
    block_t: time tile T (a power of two; 128 fills a TPU v5e MXU, 256 a v6e one); T = min(U,
      block_t), grown so that U / T <= max_tiles (the kernel unrolls 2 U / T - 1 tile products).
    block_d: channels per grid step (a multiple of 8 on TPU unless D <= block_d).
    max_tiles: the largest m = U / T.
    gpu_backend: "triton" or "mosaic_gpu" (neither lowers this kernel; kept for symmetry).
    poison_output: testing aid: the kernel writes into a NaN-filled buffer aliased to its output
      (it does not zero it first), so any output element it fails to write stays NaN.

  Returns:
    (U, S, B, D) float32.
  """
  size, streams, batch, channels = check_block_shapes(inputs, taps)
  for name, value in (("U", size), ("block_t", block_t)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two; got {value}.")
  tile = tile_size(size, block_t, max_tiles)

  def build(target):
    def run(x, w, *poison):
      return _mxu_call(x, w, poison[0] if poison else None, target=target, tile=tile,
                       block_d=block_d)
    return run

  args = (inputs, taps)
  if poison_output:
    args += (jnp.full((size, streams, batch, channels), jnp.nan, jnp.float32),)
  return _dispatch.dispatch(build, interpret, gpu_backend)(*args)
