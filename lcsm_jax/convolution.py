"""Causal long convolutions over the time axis: FFT (fast) and direct (reference).

Shapes: inputs are `(..., L, C)` with time on the second-to-last axis and channels last;
filters are `(Lh, C)` with `Lh >= L` taps (only the first `L` are used, so a filter computed
for a longer length gives the same result: filters are prefix-consistent).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def fft_length(n: int) -> int:
  """Smallest 2^a 3^b 5^c >= n: a transform size XLA's FFT handles without slow prime factors."""
  if n < 1:
    raise ValueError(f"fft_length needs n >= 1, got {n}.")
  best = 1 << (n - 1).bit_length()
  p5 = 1
  while p5 < best:
    p35 = p5
    while p35 < best:
      p = p35
      while p < n:
        p *= 2
      best = min(best, p)
      p35 *= 3
    p5 *= 5
  return best


def _compute_dtype(dtype) -> jnp.dtype:
  """FFTs run in float32 (float64 under x64 inputs); jnp.fft rejects bfloat16."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


SPECTRUM_GROUP_BYTES = 1 << 26  # larger spectra are computed a group of channels at a time


def causal_conv_fft(u: jax.Array, h: jax.Array, *, skip: jax.Array | None = None,
                    stream: jax.Array | int | None = None) -> jax.Array:
  """`y[..., t, c] = sum_{s <= t} u[..., s, c] * h[t - s, c]` through one real FFT of size >= 2L.

  The filter's transform waits for `u` (a data dependence): in a stack of layers XLA
  would otherwise transform every layer's filter up front and keep all the spectra alive (16
  GiB for 8 x 256 channels at 2^20 positions). Where one spectrum of `u` would exceed
  `SPECTRUM_GROUP_BYTES`, the channels are transformed a group at a time, each group's result
  written over its input (a loop; XLA copies `u` first only if the caller still needs it), so
  that the working memory is `u` and a few of one group's spectra.

  Args:
    u: `(..., L, C)` input.
    h: `(Lh, C)` filter taps, `Lh >= L`; with `stream`, `(Lh, S, C)`: the filters of S
      streams, of which `h[:, stream]` is used (read a channel group at a time, never copied
      whole).
    skip: optional `(C,)`: the result is the convolution plus `u * skip` (a Hyena block's skip
      term), computed with each group, so that no second array of `u`'s size is needed.
    stream: the filter's index in a 3-D `h` (may be traced).
  Returns:
    `(..., L, C)` in the compute dtype (float32, or float64 for float64 inputs).
  """
  _check_filter(u, h, streams=stream is not None)
  if stream is None:
    h = h[:, None]
  length, channels = u.shape[-2:]
  dtype = _compute_dtype(jnp.result_type(u.dtype, h.dtype))
  n = fft_length(2 * length)
  u = u.astype(dtype)
  index = 0 if stream is None else stream
  first_row = (0,) * (u.ndim - 2) + (slice(0, 1), slice(None))

  def conv(start, width, u, *skip):
    h_group = jax.lax.dynamic_slice(h, (0, index, start), (length, 1, width))[:, 0]
    # a data dependence (0 * u[first]): XLA:CPU drops optimization barriers before scheduling
    h_group = h_group.astype(dtype) + 0 * u[first_row][0]
    u_f = jnp.fft.rfft(u, n=n, axis=-2)
    h_f = jnp.fft.rfft(h_group, n=n, axis=0)
    y = jnp.fft.irfft(u_f * h_f, n=n, axis=-2)[..., :length, :]
    return y + u * skip[0].astype(dtype) if skip else y

  rows = int(np.prod(u.shape[:-2], dtype=np.int64)) * (n // 2 + 1)
  operands = (u,) if skip is None else (u, skip)
  return by_channel_groups(conv, operands, u.shape, dtype,
                           rows * channels * 2 * np.dtype(dtype).itemsize, in_place=True)


causal_conv_fft.fuses_skip = True  # takes skip= and stream= (`convolve`)


def convolve(conv: Callable[..., jax.Array], u: jax.Array, h: jax.Array, skip: jax.Array, *,
             stream: jax.Array | int | None = None) -> jax.Array:
  """`conv(u, h) + u * skip` for any long convolution `conv` (u (..., L, C), h (>= L, C), skip
  (C,)), or with `stream` the filter `h[:, stream]` of 3-D filters (>= L, S, C). A `conv` that
  says `fuses_skip` (`causal_conv_fft`, the engine's on a mesh) does both itself, a channel
  group at a time, and so never copies the filter or holds a second array of `u`'s size."""
  if getattr(conv, "fuses_skip", False):
    return conv(u, h, skip=skip, stream=stream)
  if stream is not None:
    h = jax.lax.dynamic_index_in_dim(h, stream, axis=1, keepdims=False)
  return conv(u, h) + u.astype(h.dtype) * skip


def by_channel_groups(fn: Callable[..., jax.Array], operands: Sequence[jax.Array],
                      out_shape: tuple[int, ...], dtype, spectrum_bytes: int, *,
                      in_place: bool = False) -> jax.Array:
  """`fn(0, C, *operands)`, channel-independent along the last axis of every operand and of its
  result (`out_shape`, `dtype`), computed a group of channels at a time where a spectrum of
  `spectrum_bytes` over all channels exceeds `SPECTRUM_GROUP_BYTES` (`channel_groups`): a loop
  calling `fn(start, width, *group_slices)` for the channels [start, start + width) and
  writing each group's result in place, in a new array or (`in_place`, where `out_shape` and
  `dtype` are those of `operands[0]`) over `operands[0]`, from which each group reads its
  slice before writing it. One group: `fn(0, C, *operands)` itself."""
  channels = out_shape[-1]
  groups = channel_groups(channels, spectrum_bytes)
  if groups == 1:
    return fn(0, channels, *operands)
  width = channels // groups
  group = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, width, axis=-1)

  def add_group(g, out):
    start = g * width
    inputs = (out, *operands[1:]) if in_place else operands
    result = fn(start, width, *[group(x, start) for x in inputs])
    return jax.lax.dynamic_update_slice_in_dim(out, result.astype(dtype), start, axis=-1)

  out = operands[0].astype(dtype) if in_place else jnp.zeros(out_shape, dtype)
  return jax.lax.fori_loop(0, groups, add_group, out)


def channel_groups(channels: int, spectrum_bytes: int) -> int:
  """The fewest groups, a divisor of `channels`, whose share of a spectrum of `spectrum_bytes`
  (all channels) is at most `SPECTRUM_GROUP_BYTES`."""
  for groups in range(1, channels + 1):
    if channels % groups == 0 and spectrum_bytes <= groups * SPECTRUM_GROUP_BYTES:
      return groups
  return channels


def causal_conv_direct(u: jax.Array, h: jax.Array) -> jax.Array:
  """The same convolution as `causal_conv_fft`, by the O(L^2) sum over lags (test reference)."""
  _check_filter(u, h)
  length = u.shape[-2]
  dtype = _compute_dtype(jnp.result_type(u.dtype, h.dtype))
  u = u.astype(dtype)
  h = h[:length].astype(dtype)
  padded = jnp.concatenate([jnp.zeros_like(u), u], axis=-2)  # (..., 2L, C)

  def add_lag(lag, y):
    shifted = jax.lax.dynamic_slice_in_dim(padded, length - lag, length, axis=-2)
    return y + shifted * h[lag]

  return jax.lax.fori_loop(0, length, add_lag, jnp.zeros_like(u))


def causal_conv_numpy(u: np.ndarray, h: np.ndarray) -> np.ndarray:
  """Direct O(L^2) causal convolution in float64 NumPy: independent of JAX, for tests."""
  u = np.asarray(u, np.float64)
  h = np.asarray(h, np.float64)
  length = u.shape[-2]
  y = np.zeros_like(u)
  for lag in range(length):
    y[..., lag:, :] += u[..., :length - lag, :] * h[lag]
  return y


def _check_filter(u: jax.Array, h: jax.Array, streams: bool = False) -> None:
  """h (taps, channels), or with `streams` (taps, streams, channels), for u (..., L, C)."""
  shape = "(taps, streams, channels)" if streams else "(taps, channels)"
  if h.ndim != 2 + streams:
    raise ValueError(f"filter must have shape {shape}, got {h.shape}.")
  if u.ndim < 2 or u.shape[-1] != h.shape[-1]:
    raise ValueError(f"input (..., L, C) {u.shape} does not match filter {shape} {h.shape}.")
  if h.shape[0] < u.shape[-2]:
    raise ValueError(
        f"filter has {h.shape[0]} taps, fewer than the sequence length {u.shape[-2]}.")


LONG_CONVOLUTIONS = {"fft": causal_conv_fft, "direct": causal_conv_direct}


@functools.cache
def long_convolution(name):
  """The long-convolution function by name: 'fft' (default) or 'direct'; a callable
  `(u (B, L, C), h (>= L, C)) -> (B, L, C)` is returned as it is (e.g. the FFT convolution run
  on each device's shards, `decoding.Engine.long_conv`)."""
  if callable(name):
    return name
  if name not in LONG_CONVOLUTIONS:
    raise ValueError(f"unknown long convolution {name!r}; choose one of {sorted(LONG_CONVOLUTIONS)}.")
  return LONG_CONVOLUTIONS[name]
