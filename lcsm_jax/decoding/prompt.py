"""The prompt's contribution to every later position of the long convolutions.

A prompt of P positions is processed by one parallel forward; what its long-convolution inputs
contribute to each online position r (absolute P + r) is added by one FFT per stream (a
channel group at a time where the spectra are large), or, for
prompts of at most DIRECT_PROMPT_MAX positions, by P shifted products (cheaper than transforms
of size P + M).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax import convolution

Array = jax.Array

DIRECT_PROMPT_MAX = 8  # prompts up to this length add their contribution without an FFT


def prompt_contribution(prompt_inputs: Array, taps: Array, num_steps: int) -> Array:
  """Contribution of the prompt's inputs to every online position.

  Args:
    prompt_inputs: (P, S, B, D) long-convolution inputs of the prompt.
    taps: (>= P + M, S, D) filters.
    num_steps: M.
  Returns:
    (M, S, B, D) float32: out[r] = sum_{s < P} prompt_inputs[s] * taps[P + r - s].
  """
  length, streams, batch, width = prompt_inputs.shape
  if length == 0 or num_steps == 0:
    return jnp.zeros((num_steps, streams, batch, width), jnp.float32)
  if length <= DIRECT_PROMPT_MAX:
    return prompt_products(prompt_inputs, taps, 0, num_steps)
  total = length + num_steps
  n = convolution.fft_length(total)
  inputs = prompt_inputs.astype(jnp.float32)
  taps = taps[:total]

  def contribution(start, width, x, h):  # x (P, S, B, D'), h (total, S, D') -> (M, S, B, D')
    del start, width
    x_f = jnp.fft.rfft(x, n=n, axis=0)
    h_f = jnp.fft.rfft(h.astype(jnp.float32), n=n, axis=0)
    return jnp.fft.irfft(x_f * h_f[:, :, None], n=n, axis=0)[length:total]

  # at P + M = 2^20 and 2048 channels one spectrum of every channel is 8 GiB: the transform of
  # all of them at once held ~33 GiB
  return convolution.by_channel_groups(contribution, (inputs, taps),
                                       (num_steps, streams, batch, width), jnp.float32,
                                       (n // 2 + 1) * streams * (batch + 1) * width * 8)


def prompt_products(prompt_inputs: Array, taps: Array, start, rows: int) -> Array:
  """Rows [start, start + rows) of `prompt_contribution` by P shifted products (short prompts):
  (rows, S, B, D) float32. `start` may be traced."""
  length = prompt_inputs.shape[0]
  window = lambda s: lax.dynamic_slice_in_dim(taps, length + start - s, rows, axis=0)
  return sum(prompt_inputs[s].astype(jnp.float32) * window(s)[:, :, None, :].astype(jnp.float32)
             for s in range(length))
