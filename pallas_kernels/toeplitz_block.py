"""Pallas kernel for the Toeplitz block of the tiled generation schedule (direct, O(U^2) form).

Contract (the engine calls exactly this; see `toeplitz_block_reference.py`):

  toeplitz_block(inputs, taps) -> out
    inputs: (U, S, B, D) float32 or bfloat16, activations a[i-U+1 .. i] of S streams
    taps:   (2U, S, D)   float32 or bfloat16, filter taps rho[0 .. 2U-1] (tap 0 is never used)
    out:    (U, S, B, D) float32, out[j, s, b, d] = sum_k inputs[k, s, b, d] * taps[U + j - k, s, d]

One `pallas_call` computes the block of every stream, batch row and channel. Layout: the
wrapper only reshapes (no transpose), `inputs` to (U, S*B*D') and `taps` to (2U, S*D'), where
D' is D padded up to a multiple of the channel tile; both reshapes are free. Grid:
(stream, channel tile, batch row, output-time tile), every axis parallel. A grid step holds the
whole input block (U, Dt) and all taps (2U, Dt) of its stream and channel tile in VMEM / shared
memory (their block index does not change along the two inner axes, so they are fetched once)
and writes an output tile (Tj, Dt):

  acc = 0;  for k in 0..U-1:  acc += inputs[k, :] * taps[U + j0 - k : U + j0 - k + Tj, :]

i.e. U row-broadcast multiply-adds of a (Tj, Dt) slab of taps, accumulated in float32 (bfloat16
operands are upcast after the load). Kernel bodies (`BODIES`), chosen per backend:
  * "static": one output tile (Tj = U <= 64; the default on TPU and Triton for such U): the
    k loop unrolled in Python, every slice offset a compile-time constant;
  * "aligned" (TPU, larger U): k = g*k1 + k2; per k1 one window of Tj + g taps rows is loaded at
    an offset that is a multiple of g (8 rows for float32, 16 for packed bfloat16), and the g
    shifted slabs are static slices of the loaded float32 value, so Mosaic never sees a dynamic
    unaligned sublane offset;
  * "dynamic" (Triton, larger U): `taps_ref[pl.ds(U + j0 - k, Tj)]` per k in a `fori_loop`
    (pointer offsets are free on GPU, and Triton cannot slice register tensors);
  * "rows" (Mosaic GPU): one output row at a time (see below).

Backends (`interpret=None`: interpreted on CPU, compiled elsewhere, chosen when lowering):
  * TPU (Mosaic): channel tiles of 128, 256 or 512 lanes, output-time tiles of <= 64 rows;
  * GPU through Triton (default, `gpu_backend="triton"`): channel tiles of 128 (or the next power
    of two below 128), output-time tiles of <= 32 rows; every block dimension a power of two;
  * GPU through Mosaic GPU (`gpu_backend="mosaic_gpu"`): the same sum computed one output row at
    a time on 1-D rows, with explicit strided layouts (Mosaic GPU rejects the row-broadcast
    multiply of the slab form: "Incompatible FragmentedArray layouts"). Driving Mosaic GPU through
    `pl.pallas_call` is deprecated by JAX in favour of `plgpu.kernel`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch
from pallas_kernels.toeplitz_block_reference import check_block_shapes

Array = jax.Array

_TPU_CHANNEL_TILES = (512, 256, 128)
_STATIC_MAX = 64  # up to this U (with one output-time tile) the k loop is unrolled statically
BODIES = ("static", "aligned", "dynamic", "rows")


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _default_tiles(target: str, size: int, channels: int) -> tuple[int, int]:
  """(channel tile Dt, output-time tile Tj) for a target."""
  if target == "triton":
    return min(128, _next_power_of_two(channels)), min(size, 32)
  if target == "mosaic_gpu":  # a strided row layout needs >= 128 elements (one warpgroup)
    return 128, min(size, 64)
  # TPU and the interpreter: lanes of 128 (the array's own last dim is never equal to one tile
  # once streams and batch rows are flattened into it, so Dt must be a multiple of 128).
  padded = -(-channels // 128) * 128
  channel_tile = next(t for t in _TPU_CHANNEL_TILES if padded % t == 0)
  return channel_tile, min(size, 64)


def _static_kernel(x_ref, w_ref, *refs):
  """One output tile (Tj = U): x_ref (U, Dt), w_ref (2U, Dt), o_ref (U, Dt); the k loop unrolled
  in Python, so every slice offset is a compile-time constant. refs = ([poison,] o_ref)."""
  o_ref = refs[-1]
  size = x_ref.shape[0]
  acc = jnp.zeros(o_ref.shape, jnp.float32)
  for k in range(size):
    row = x_ref[pl.ds(k, 1), :].astype(jnp.float32)               # (1, Dt)
    window = w_ref[pl.ds(size - k, size), :].astype(jnp.float32)  # (U, Dt)
    acc = acc + row * window
  o_ref[...] = acc


def _aligned_kernel(x_ref, w_ref, *refs, group: int):
  """Output tile j of Tj rows, k split as group * k1 + k2 (TPU form).

  Per k1 one window of taps starting at the multiple of `group` U + j0 - group * (k1 + 1) is
  loaded (an aligned dynamic offset), upcast, and the `group` shifted slabs are static slices of
  that value: no dynamic unaligned sublane offset, and no slicing of packed bfloat16 data.
  """
  o_ref = refs[-1]
  size = x_ref.shape[0]
  tile = o_ref.shape[0]
  j0 = pl.program_id(3) * tile

  def step(k1, acc):
    base = pl.multiple_of(size + j0 - group * (k1 + 1), group)
    window = w_ref[pl.ds(base, tile + group), :].astype(jnp.float32)   # (Tj + g, Dt)
    rows = x_ref[pl.ds(pl.multiple_of(group * k1, group), group), :].astype(jnp.float32)
    for k2 in range(group):  # taps[U + j0 - k + jj] = window[group - k2 + jj]
      acc = acc + rows[k2:k2 + 1] * window[group - k2:group - k2 + tile]
    return acc

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  o_ref[...] = jax.lax.fori_loop(0, size // group, step, acc)


def _dynamic_kernel(x_ref, w_ref, *refs):
  """Output tile j of Tj rows, one dynamic slab offset per k (Triton form: pointer offsets are
  free there, and Triton cannot slice register tensors)."""
  o_ref = refs[-1]
  size = x_ref.shape[0]
  tile = o_ref.shape[0]
  j0 = pl.program_id(3) * tile

  def term(k, acc):
    row = x_ref[pl.ds(k, 1), :].astype(jnp.float32)                    # (1, Dt)
    window = w_ref[pl.ds(size + j0 - k, tile), :].astype(jnp.float32)  # (Tj, Dt)
    return acc + row * window

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  o_ref[...] = jax.lax.fori_loop(0, size, term, acc)


def _rows_kernel(x_ref, w_ref, *refs, cast_layouts: bool):
  """The same sum, one output row (Dt,) at a time (for Mosaic GPU's layout system)."""
  o_ref = refs[-1]
  size = x_ref.shape[0]
  tile, width = o_ref.shape
  j0 = pl.program_id(3) * tile

  def zeros():
    z = jnp.zeros((width,), jnp.float32)
    if cast_layouts:
      from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
      z = plgpu.layout_cast(z, plgpu.Layout.WG_STRIDED((width,), vec_size=1))
    return z

  def row(j, carry):
    def term(k, acc):
      return acc + x_ref[k].astype(jnp.float32) * w_ref[size + j0 + j - k].astype(jnp.float32)
    o_ref[j] = jax.lax.fori_loop(0, size, term, zeros())
    return carry

  jax.lax.fori_loop(0, tile, row, 0)


def _default_body(target: str, size: int, time_tile: int) -> str:
  if target == "mosaic_gpu":
    return "rows"
  if time_tile == size and size <= _STATIC_MAX:
    return "static"
  return "dynamic" if target == "triton" else "aligned"


def _compiler_params(target: str, grid_rank: int):
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  if target == "triton":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=1)
  if target == "mosaic_gpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.CompilerParams()
  return None


def _block_call(inputs: Array, taps: Array, poison: Array | None, *, target: str,
                block_d: int | None, block_t: int | None, body: str | None) -> Array:
  """One pallas_call for `target` ("interpret", "tpu", "triton" or "mosaic_gpu")."""
  size, streams, batch, channels = inputs.shape
  channel_tile, time_tile = _default_tiles(target, size, channels)
  channel_tile = block_d or channel_tile
  time_tile = min(block_t or time_tile, size)
  if size % time_tile:
    raise ValueError(f"the output-time tile {time_tile} must divide U = {size}.")
  n_tiles = -(-channels // channel_tile)
  padded = n_tiles * channel_tile
  if padded != channels:  # zero channels: their outputs are computed and dropped
    inputs = jnp.pad(inputs, ((0, 0), (0, 0), (0, 0), (0, padded - channels)))
    taps = jnp.pad(taps, ((0, 0), (0, 0), (0, padded - channels)))
    if poison is not None:
      poison = jnp.pad(poison, ((0, 0), (0, 0), (0, 0), (0, padded - channels)),
                       constant_values=jnp.nan)
  x2 = inputs.reshape(size, streams * batch * padded)
  w2 = taps.reshape(2 * size, streams * padded)

  grid = (streams, n_tiles, batch, size // time_tile)
  x_spec = pl.BlockSpec((size, channel_tile), lambda s, c, b, j: (0, (s * batch + b) * n_tiles + c))
  w_spec = pl.BlockSpec((2 * size, channel_tile), lambda s, c, b, j: (0, s * n_tiles + c))
  o_spec = pl.BlockSpec((time_tile, channel_tile),
                        lambda s, c, b, j: (j, (s * batch + b) * n_tiles + c))
  out_shape = jax.ShapeDtypeStruct((size, streams * batch * padded), jnp.float32)

  if body is None:
    body = _default_body(target, size, time_tile)
  if body == "static":
    if time_tile != size:
      raise ValueError("the static body needs one output-time tile (block_t >= U).")
    kernel = _static_kernel
  elif body == "aligned":
    # Groups of one (f32) or one packed (bf16) sublane tile: 8 or 16 rows.
    group = min(size, 8 * max(1, 4 // jnp.dtype(taps.dtype).itemsize))
    kernel = functools.partial(_aligned_kernel, group=group)
  elif body == "dynamic":
    kernel = _dynamic_kernel
  elif body == "rows":
    kernel = functools.partial(_rows_kernel, cast_layouts=(target == "mosaic_gpu"))
  else:
    raise ValueError(f"unknown kernel body {body!r}; choose one of {BODIES}.")

  args, in_specs, aliases = [x2, w2], [x_spec, w_spec], {}
  if poison is not None:  # start from a NaN-filled output buffer: unwritten elements stay NaN
    args.append(poison.reshape(out_shape.shape))
    in_specs.append(o_spec)
    aliases = {2: 0}
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=o_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(target, len(grid)),
      interpret=(target == "interpret"),
      name="toeplitz_block",
  )(*args)
  return out.reshape(size, streams, batch, padded)[..., :channels]


def toeplitz_block(inputs: Array, taps: Array, *, interpret: bool | None = None,
                   block_d: int | None = None, block_t: int | None = None,
                   gpu_backend: _dispatch.GpuBackend = "triton",
                   poison_output: bool = False, _body: str | None = None) -> Array:
  """The Toeplitz block of all streams, batch rows and channels in one Pallas kernel.

  Args:
    inputs: (U, S, B, D) float32 or bfloat16; U a power of two.
    taps: (2U, S, D) float32 or bfloat16.
    interpret: True: run the kernel in the Pallas interpreter on any platform; False: compiled
      (fails on CPU); None: interpreted on CPU, compiled on TPU and GPU (chosen at lowering).
    block_d: channel tile (default per backend: 128..512 on TPU, 128 on GPU). On TPU it must be
      a multiple of 128; on Triton a power of two. D is zero-padded to a multiple of it.
    block_t: output-time tile (default 64 on TPU, 32 on Triton), a power of two.
    gpu_backend: "triton" (default) or "mosaic_gpu".
    poison_output: testing aid: the kernel writes into a NaN-filled buffer (aliased to its
      output) instead of a fresh one, so any output element it fails to write stays NaN.
    _body: testing aid: forces a kernel body, one of BODIES (default: "static" when one
      output-time tile covers U <= 64, else "aligned" on TPU and in the interpreter, "dynamic"
      on Triton; "rows" on Mosaic GPU).

  Returns:
    (U, S, B, D) float32: out[j] = sum_k inputs[k] * taps[U + j - k] per stream and channel.
  """
  size, streams, batch, channels = check_block_shapes(inputs, taps)
  if not _is_power_of_two(size):
    raise ValueError(f"the block size U must be a power of two; got {size}.")
  for name, value in (("block_d", block_d), ("block_t", block_t)):
    if value is not None and not _is_power_of_two(value):
      raise ValueError(f"{name} must be a power of two; got {value}.")

  if _body is not None and _body not in BODIES:
    raise ValueError(f"_body must be one of {BODIES}; got {_body!r}.")

  def build(target):
    def run(x, w, *poison):
      return _block_call(x, w, poison[0] if poison else None, target=target,
                         block_d=block_d, block_t=block_t, body=_body)
    return run

  args = (inputs, taps)
  if poison_output:
    args += (jnp.full((size, streams, batch, channels), jnp.nan, jnp.float32),)
  return _dispatch.dispatch(build, interpret, gpu_backend)(*args)
