"""Block operations of the tiled schedule: the contribution of U consecutive inputs to the next
outputs of every long convolution (a "middle product" with a U x U Toeplitz matrix).

Layout (time-major, as the generation state stores it):
  inputs: (U, S, B, D) activations a[i-U .. i-1] of S streams (layers x convolutions), B rows, D
  taps:   (2U, S, D)   filter taps rho[0 .. 2U-1] (tap 0 is never used)
  output: (V, S, B, D) with V <= U:  out[j] = sum_k inputs[k] * taps[U + j - k]

Implementations ("tau"): `direct` (O(U^2) shift-and-add, fastest for small U), `fft` (one real
2U-point transform each way with the filter's spectrum precomputed once per model: an FFT, or
up to MATMUL_DFT_MAX a product with the DFT matrices, which XLA:CPU runs on every core while
its FFT runs on one), and `pallas` (the kernel
in `pallas_kernels`: interpreted on CPU, compiled on GPU and TPU). With `layer_parallel` one
call covers all streams (the per-stream computation vectorised over the stacked stream axis, the
batching `vmap` would give, with no transposes of the state); otherwise one call per stream.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ("direct", "fft", "pallas")


UNROLLED_DIRECT_MAX = 64  # larger direct blocks loop over k instead of unrolling the sum
MATMUL_DFT_MAX = 64  # blocks up to this size transform by products with the DFT matrices, not
                     # by FFT (`python -m experiments.transforms`, 2048 rows, one core / two:
                     # by matrices 0.59 / 0.71x the FFT's time at U = 16, 0.75 / 0.36x at 64,
                     # 1.24 / 0.67x at 128: XLA:CPU runs its dots on every core, its FFT on one)


def direct_block(inputs: Array, taps: Array, out_len: int) -> Array:
  """Shift-and-add: inputs (U, *C), taps (2U, *C) broadcastable -> (out_len, *C) float32.

  C is any trailing shape (one stream's (B, D), or all streams' (S, B, D) with taps (S, 1, D)).
  """
  size = inputs.shape[0]
  inputs, taps = inputs.astype(jnp.float32), taps.astype(jnp.float32)
  if size > UNROLLED_DIRECT_MAX:
    def add_term(k, out):
      window = jax.lax.dynamic_slice_in_dim(taps, size - k, out_len, axis=0)
      return out + jax.lax.dynamic_index_in_dim(inputs, k, 0, keepdims=True) * window
    zeros = jnp.zeros((out_len,) + jnp.broadcast_shapes(inputs.shape[1:], taps.shape[1:]),
                      jnp.float32)
    return jax.lax.fori_loop(0, size, add_term, zeros)
  out = None
  for k in range(size):
    term = inputs[k][None] * taps[size - k:size - k + out_len]
    out = term if out is None else out + term
  return out


def filter_spectrum(taps: Array, size: int) -> Array:
  """rfft of taps[0 .. 2U-1] along time for block size U: (2U, ..., D) -> (..., D, U + 1)."""
  window = jnp.moveaxis(taps[:2 * size], 0, -1)
  return jnp.fft.rfft(window.astype(jnp.float32), n=2 * size)


def transforms_by_matmul(size: int) -> bool:
  """Whether `input_spectrum` and `outputs_from_spectrum` of blocks of `size` multiply by the
  DFT matrices (`dft_matrices`) instead of running an FFT."""
  return size <= MATMUL_DFT_MAX


@functools.lru_cache(maxsize=None)
def dft_matrices(size: int) -> tuple[np.ndarray, np.ndarray]:
  """The 2U-point real DFT of a block of U = `size` inputs followed by U zeros, and the second
  half of its inverse, as real float32 matrices (computed in float64):

    forward (U, 2U + 2): x (*C, U) @ forward = [Re X, Im X], X = rfft(x, n=2U) (U + 1 bins);
    inverse (2U + 2, U): [Re P, Im P] @ inverse = irfft(P, n=2U)[U:2U] (like irfft, the
      imaginary parts of bins 0 and U are ignored).
  """
  time = np.arange(size, dtype=np.float64)
  bins = np.arange(size + 1, dtype=np.float64)
  angle = np.pi * np.outer(time, bins) / size  # 2 pi n k / 2U
  forward = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)
  weight = np.where((bins == 0) | (bins == size), 1.0, 2.0)[:, None] / (2 * size)
  angle = np.pi * np.outer(bins, time + size) / size  # output points U .. 2U - 1
  sine = -weight * np.sin(angle)
  sine[[0, size]] = 0.0
  inverse = np.concatenate([weight * np.cos(angle), sine], axis=0)
  return forward.astype(np.float32), inverse.astype(np.float32)


def input_spectrum(inputs: Array, by_matmul: bool | None = None) -> Array:
  """rfft of U inputs zero-padded to 2U points, time on the last axis: (*C, U) -> (*C, U + 1)
  complex64; by the DFT matrices or by FFT as `by_matmul` says (default: up to
  MATMUL_DFT_MAX by the matrices)."""
  size = inputs.shape[-1]
  inputs = inputs.astype(jnp.float32)
  if not (transforms_by_matmul(size) if by_matmul is None else by_matmul):
    return jnp.fft.rfft(inputs, n=2 * size)
  parts = jnp.matmul(inputs, dft_matrices(size)[0], precision=lax.Precision.HIGHEST)
  return lax.complex(parts[..., :size + 1], parts[..., size + 1:])


def outputs_from_spectrum(spectrum: Array, out_len: int, by_matmul: bool | None = None
                          ) -> Array:
  """The second half of the 2U-point inverse, time on the last axis: (*C, U + 1) ->
  (*C, out_len) float32 (points U .. U + out_len - 1 of the circular product, where a block's
  outputs land); `by_matmul` as in `input_spectrum`."""
  size = spectrum.shape[-1] - 1
  if not (transforms_by_matmul(size) if by_matmul is None else by_matmul):
    return jnp.fft.irfft(spectrum, n=2 * size)[..., size:size + out_len]
  parts = jnp.concatenate([jnp.real(spectrum), jnp.imag(spectrum)], axis=-1)
  return jnp.matmul(parts, dft_matrices(size)[1][:, :out_len], precision=lax.Precision.HIGHEST)


def fft_block(inputs: Array, spectrum: Array, out_len: int) -> Array:
  """Inputs (U, *C), spectrum (*C', U + 1) of taps[0:2U], C' broadcastable to C
  -> (out_len, *C) float32, by one real FFT of size 2U."""
  product = input_spectrum(jnp.moveaxis(inputs, 0, -1)) * spectrum
  return jnp.moveaxis(outputs_from_spectrum(product, out_len), -1, 0)


def filter_window(taps: Array, start, length: int, offsets: tuple = (),
                  sizes: tuple = ()) -> Array:
  """taps[start : start + length] along axis 0, zero where that runs outside the taps.

  `start` may be traced and negative; the result has `length` rows whatever it is (a plain
  dynamic slice would clamp its start and silently shift the window). `offsets` and `sizes`
  slice the trailing axes in the same read (default: whole)."""
  total = taps.shape[0]
  if total < length:
    taps = jnp.pad(taps, [(0, length - total)] + [(0, 0)] * (taps.ndim - 1))
    total = length
  sizes = tuple(sizes) + taps.shape[1 + len(sizes):]
  offsets = tuple(offsets) + (0,) * (taps.ndim - 1 - len(offsets))
  if isinstance(start, int) and 0 <= start <= total - length:  # static: no gather
    return lax.dynamic_slice(taps, (start,) + offsets, (length,) + sizes)
  inside = jnp.clip(start, 0, total - length)
  rows = lax.dynamic_slice(taps, (inside,) + offsets, (length,) + sizes)
  index = jnp.arange(length) + (start - inside)
  inside_taps = ((index >= 0) & (index < length)).reshape((length,) + (1,) * (taps.ndim - 1))
  # jnp.take would wrap negative indices around: clip, then zero what lies outside
  return jnp.where(inside_taps, jnp.take(rows, jnp.clip(index, 0, length - 1), axis=0), 0)


def window_spectra(taps: Array, size: int, distances: int) -> Array:
  """Spectra of the filter windows taps[(d - 1)U : (d + 1)U] for block distances
  d = 1 .. `distances`: (T, ..., D) -> (distances, ..., D, U + 1) complex64 (zero past T)."""
  total = (distances + 1) * size
  if taps.shape[0] < total:
    taps = jnp.pad(taps, [(0, total - taps.shape[0])] + [(0, 0)] * (taps.ndim - 1))
  return jnp.stack([filter_spectrum(taps[(d - 1) * size:], size)
                    for d in range(1, distances + 1)])


def pallas_block(inputs: Array, taps: Array, out_len: int) -> Array:
  """All streams at once through the Pallas Toeplitz kernel: (U, S, B, D) -> (out_len, S, B, D)."""
  from pallas_kernels import toeplitz_block  # optional dependency of the engine
  window = taps[:2 * inputs.shape[0]]
  # The last block may be truncated and the filter shorter than 2U: taps past it are unused.
  window = jnp.pad(window, [(0, 2 * inputs.shape[0] - window.shape[0]), (0, 0), (0, 0)])
  return toeplitz_block(inputs, window)[:out_len]


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """How the blocks of one plan are computed.

  Attributes:
    methods: implementation per block size, e.g. ((1, 'direct'), ..., (4096, 'fft')).
    layer_parallel: one batched call over all streams (True) or one call per stream (False).
  """

  methods: tuple[tuple[int, str], ...]
  layer_parallel: bool = True

  def __post_init__(self):
    for size, method in self.methods:
      if method not in IMPLEMENTATIONS:
        raise ValueError(f"unknown block implementation {method!r} for size {size}; "
                         f"choose one of {IMPLEMENTATIONS}.")

  def method(self, size: int) -> str:
    return dict(self.methods)[size]


PALLAS_MAX_SIZE = 256  # tau='pallas': the O(U^2) kernel up to here, FFT blocks above


def method_for(size: int, tau, pallas_max: int | None = None) -> str | None:
  """The implementation of blocks of `size` under a resolved `tau` (see `EngineOptions.tau`;
  not 'auto'): 'direct', 'fft', 'pallas', or None when a mapping does not name the size.
  pallas_max: with an integer tau, the Pallas kernel for sizes up to this (measured on an
  accelerator; None on CPU)."""
  if isinstance(tau, tuple):
    return dict(tau).get(size)
  if tau == "pallas":
    return "pallas" if size <= PALLAS_MAX_SIZE else "fft"
  if isinstance(tau, str):
    if tau not in IMPLEMENTATIONS:
      raise ValueError(f"tau={tau!r} must be resolved to a crossover before blocks run.")
    return tau
  if pallas_max and size <= pallas_max:
    return "pallas"
  return "direct" if size <= tau else "fft"


def block_config(sizes: Sequence[int], tau, *, pallas_max: int | None = None,
                 layer_parallel: bool = True) -> BlockConfig:
  """The implementation of every block size of a plan under a resolved `tau` (pure)."""
  methods = {s: method_for(s, tau, pallas_max) for s in sizes}
  missing = [s for s, method in methods.items() if method is None]
  if missing:
    raise ValueError(f"tau mapping has no implementation for block sizes {missing}.")
  return BlockConfig(tuple(sorted(methods.items())), layer_parallel)


def spectra_for(taps: Array, sizes: Sequence[int]) -> dict[int, Array]:
  """Filter spectra {U: (S, D, U + 1)} of taps (T, S, D) for the block sizes U in `sizes`."""
  return {size: filter_spectrum(taps, size) for size in sizes}


def apply_block(config: BlockConfig, inputs: Array, taps: Array,
                spectra: Mapping[int, Array], out_len: int) -> Array:
  """The block contribution for all streams: inputs (U, S, B, D) -> (out_len, S, B, D) float32.

  taps: (T, S, D) (only the first 2U are read); spectra: from `spectra_for` (sizes missing
  there transform their filter slice here).
  With `layer_parallel`, one call covers every stream (layers x convolutions), batch row and
  channel: the per-stream computation vectorised over the stacked stream axis, as `vmap` over
  streams would produce, but with the stream axis kept in place so that no transposes of the
  state are made. Otherwise one call per stream (ablation).
  """
  size = inputs.shape[0]
  method = config.method(size)
  if method == "pallas":
    return pallas_block(inputs, taps, out_len).astype(jnp.float32)
  if method == "direct":
    window = taps[:2 * size, :, None, :]                                # (2U, S, 1, D)
    one = lambda x, w: direct_block(x, w, out_len)
    stream_axis = 1
  else:
    spectrum = spectra[size] if size in spectra else filter_spectrum(taps, size)
    window = spectrum[:, None]                                         # (S, 1, D, U + 1)
    one = lambda x, w: fft_block(x, w, out_len)
    stream_axis = 0
  if config.layer_parallel:
    return one(inputs, window)
  outs = [one(inputs[:, s:s + 1], jax.lax.slice_in_dim(window, s, s + 1, axis=stream_axis))
          for s in range(inputs.shape[1])]
  return jnp.concatenate(outs, axis=1)
