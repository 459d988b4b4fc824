"""Plain-JAX references for the Toeplitz block of the tiled generation schedule.

The block contract (time-major, as the generation engine stores activations):

  inputs: (U, S, B, D)  activations a[i-U+1 .. i] of S streams, B batch rows, D channels
  taps:   (2U, S, D)    filter taps rho[0 .. 2U-1] of every stream and channel (tap 0 unused)
  out:    (U, S, B, D)  float32,
          out[j, s, b, d] = sum_{k=0}^{U-1} inputs[k, s, b, d] * taps[U + j - k, s, d]

Two independent formulations, both accumulating in float32:

* `toeplitz_block_reference`: materialises the U x U Toeplitz matrix of every (stream, channel)
  with an explicit gather and contracts it with one einsum: O(U^2) work, the XLA "direct" path.
* `fft_block_reference`: the FFT path, zero-pads the inputs to 2U along time, multiplies by the
  rfft of taps[0:2U] and keeps rows U .. 2U-1 of the inverse transform: O(U log U) work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def check_block_shapes(inputs: Array, taps: Array) -> tuple[int, int, int, int]:
  """Validates the contract's shapes and returns (U, S, B, D)."""
  if inputs.ndim != 4:
    raise ValueError(f"inputs must be (U, S, B, D); got shape {inputs.shape}.")
  size, streams, batch, channels = inputs.shape
  if taps.shape != (2 * size, streams, channels):
    raise ValueError(f"taps must be (2U, S, D) = {(2 * size, streams, channels)} for inputs "
                     f"{inputs.shape}; got {taps.shape}.")
  for name, x in (("inputs", inputs), ("taps", taps)):
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise TypeError(f"{name} must be float32 or bfloat16; got {x.dtype}.")
  return size, streams, batch, channels


def toeplitz_matrix(taps: Array, size: int) -> Array:
  """(2U, ...) taps -> (U, U, ...) with T[j, k] = taps[U + j - k] (an explicit gather)."""
  rows = jnp.arange(size)[:, None]
  cols = jnp.arange(size)[None, :]
  return taps[size + rows - cols]


def toeplitz_block_reference(inputs: Array, taps: Array) -> Array:
  """The block by an explicit Toeplitz gather and one einsum: (U, S, B, D) -> (U, S, B, D) f32."""
  size = check_block_shapes(inputs, taps)[0]
  matrix = toeplitz_matrix(taps.astype(jnp.float32), size)  # (U_j, U_k, S, D)
  return jnp.einsum("jksd,ksbd->jsbd", matrix, inputs.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def fft_block_reference(inputs: Array, taps: Array) -> Array:
  """The block through one real FFT of size 2U: (U, S, B, D) -> (U, S, B, D) f32.

  The product of the zero-padded inputs' spectrum with the spectrum of taps[0:2U] is a circular
  convolution of length 2U; rows U .. 2U-1 of it never wrap around, since U + j - k lies in
  [1, 2U - 1] for j, k in [0, U). (jnp.fft rejects bfloat16, so both are upcast first.)
  """
  size = check_block_shapes(inputs, taps)[0]
  n = 2 * size
  x_hat = jnp.fft.rfft(inputs.astype(jnp.float32), n=n, axis=0)      # (U + 1, S, B, D)
  w_hat = jnp.fft.rfft(taps.astype(jnp.float32), n=n, axis=0)        # (U + 1, S, D)
  y = jnp.fft.irfft(x_hat * w_hat[:, :, None, :], n=n, axis=0)       # (2U, S, B, D)
  return y[size:].astype(jnp.float32)
