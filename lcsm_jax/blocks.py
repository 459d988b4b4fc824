"""Block operations of the tiled schedule: the contribution of U consecutive inputs to the next
outputs of every long convolution (a "middle product" with a U x U Toeplitz matrix).

Layout (time-major, as the generation state stores it):
  inputs: (U, S, B, D) activations a[i-U .. i-1] of S streams (layers x convolutions), B rows, D
  taps:   (2U, S, D)   filter taps rho[0 .. 2U-1] (tap 0 is never used)
  output: (V, S, B, D) with V <= U:  out[j] = sum_k inputs[k] * taps[U + j - k]

Implementations ("tau"): `direct` (O(U^2) shift-and-add, fastest for small U), `fft` (one real
FFT of size 2U with the filter's spectrum precomputed once per model), and `pallas` (the kernel
in `pallas_kernels`: interpreted on CPU, compiled on GPU and TPU). With `layer_parallel` one
call covers all streams (the per-stream computation vectorised over the stacked stream axis, the
batching `vmap` would give, with no transposes of the state); otherwise one call per stream.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("direct", "fft", "pallas")


UNROLLED_DIRECT_MAX = 64  # larger direct blocks loop over k instead of unrolling the sum


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


def fft_block(inputs: Array, spectrum: Array, out_len: int) -> Array:
  """Inputs (U, *C), spectrum (*C', U + 1) of taps[0:2U], C' broadcastable to C
  -> (out_len, *C) float32, by one real FFT of size 2U."""
  size = inputs.shape[0]
  x = jnp.moveaxis(inputs.astype(jnp.float32), 0, -1)  # (*C, U)
  y = jnp.fft.irfft(jnp.fft.rfft(x, n=2 * size) * spectrum, n=2 * size)
  return jnp.moveaxis(y[..., size:size + out_len], -1, 0)


def pallas_block(inputs: Array, taps: Array, out_len: int) -> Array:
  """All streams at once through the Pallas Toeplitz kernel: (U, S, B, D) -> (out_len, S, B, D)."""
  from pallas_kernels import toeplitz_block  # optional dependency of the engine
  window = taps[:2 * inputs.shape[0]]
  # The last block may be truncated and the filter shorter than 2U: taps past it are unused.
  window = jnp.pad(window, [(0, 2 * inputs.shape[0] - window.shape[0]), (0, 0), (0, 0)])
  return toeplitz_block(inputs, window)[:out_len]


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """How blocks are computed.

  Attributes:
    methods: implementation per block size, e.g. {1: 'direct', ..., 4096: 'fft'}.
    layer_parallel: one batched call over all streams (True) or one call per stream (False).
    precomputed_spectra: FFT blocks read filter spectra computed once per model (True) or
      transform the filter slice inside every block (False; ablation only).
    spectra_max_size: spectra are precomputed for FFT block sizes up to this one; larger
      blocks (a few per generation) transform their filter slice themselves, so that the
      tables stay small next to the filters (None: every size).
  """

  methods: tuple[tuple[int, str], ...]
  layer_parallel: bool = True
  precomputed_spectra: bool = True
  spectra_max_size: int | None = None

  def __post_init__(self):
    for size, method in self.methods:
      if method not in IMPLEMENTATIONS:
        raise ValueError(f"unknown block implementation {method!r} for size {size}; "
                         f"choose one of {IMPLEMENTATIONS}.")

  def method(self, size: int) -> str:
    return dict(self.methods)[size]

  def fft_sizes(self) -> list[int]:
    return [size for size, method in self.methods if method == "fft"]

  def precomputed_sizes(self) -> list[int]:
    """FFT block sizes whose filter spectra `spectra_for` computes once per model."""
    if not self.precomputed_spectra:
      return []
    limit = self.spectra_max_size
    return [size for size in self.fft_sizes() if limit is None or size <= limit]


PALLAS_MAX_SIZE = 256  # tau='pallas': the O(U^2) kernel up to here, FFT blocks above


def block_config(sizes: Sequence[int], tau: str | int | Mapping[int, str],
                 *, crossover: Callable[[], int] | None = None,
                 pallas_crossover: Callable[[], int | None] | None = None,
                 layer_parallel: bool = True, precomputed_spectra: bool = True,
                 spectra_max_size: int | None = None) -> BlockConfig:
  """Resolves the user's `tau` into an implementation per block size.

  Args:
    sizes: block sizes the plan uses.
    tau: 'direct', 'fft', 'pallas' (the Pallas kernel up to PALLAS_MAX_SIZE, FFT above),
      'auto' (direct up to the measured crossover, FFT above; on accelerators with a measured
      Pallas table, the Pallas kernel where it won), an integer crossover (direct for
      U <= tau) or a mapping {U: method}.
    crossover: returns the machine's measured direct/FFT crossover; called only for 'auto'.
    pallas_crossover: returns the largest U where the Pallas kernel won on this accelerator,
      or None (CPU, or not measured); called only for 'auto'.
  """
  if isinstance(tau, Mapping):
    missing = [s for s in sizes if s not in tau]
    if missing:
      raise ValueError(f"tau mapping has no implementation for block sizes {missing}.")
    methods = {s: tau[s] for s in sizes}
  elif tau == "pallas":
    methods = {s: "pallas" if s <= PALLAS_MAX_SIZE else "fft" for s in sizes}
  elif isinstance(tau, str) and tau in IMPLEMENTATIONS:
    methods = {s: tau for s in sizes}
  elif tau == "auto" or (isinstance(tau, int) and not isinstance(tau, bool)):
    pallas_max = None
    if tau == "auto":
      if crossover is None:
        raise ValueError("tau='auto' needs a crossover source.")
      pallas_max = pallas_crossover() if pallas_crossover is not None else None
      tau = crossover()
    if tau < 0:
      raise ValueError(f"an integer tau is the largest direct block size, >= 0; got {tau}.")
    methods = {s: "direct" if s <= tau else "fft" for s in sizes}
    if pallas_max:
      methods.update({s: "pallas" for s in sizes if s <= pallas_max})
  else:
    raise ValueError(f"tau must be 'auto', 'direct', 'fft', 'pallas', an integer crossover or a "
                     f"mapping {{block size: method}}; got {tau!r}.")
  return BlockConfig(tuple(sorted(methods.items())), layer_parallel, precomputed_spectra,
                     spectra_max_size)


def spectra_for(taps: Array, config: BlockConfig) -> dict[int, Array]:
  """Filter spectra {U: (S, D, U + 1)} for the precomputed FFT block sizes; taps (T, S, D)."""
  return {size: filter_spectrum(taps, size) for size in config.precomputed_sizes()}


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
