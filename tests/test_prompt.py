"""`decoding.prompt`: the prompt's contribution to the online positions, against a float64
double loop, with every channel transformed at once and one channel group at a time."""

import jax
import numpy as np
import pytest

from lcsm_jax import convolution
from lcsm_jax.decoding import prompt as prompt_lib


def _expected(inputs, taps, num_steps):
  """out[r] = sum_{s < P} inputs[s] * taps[P + r - s], float64."""
  length = inputs.shape[0]
  inputs, taps = np.asarray(inputs, np.float64), np.asarray(taps, np.float64)
  out = np.zeros((num_steps,) + inputs.shape[1:])
  for r in range(num_steps):
    for s in range(length):
      out[r] += inputs[s] * taps[length + r - s][:, None, :]
  return out


@pytest.mark.parametrize("group_bytes", [None, 1])
@pytest.mark.parametrize("length, num_steps, streams, batch, width", [
    (13, 7, 2, 3, 5), (20, 1, 1, 1, 4), (9, 30, 3, 2, 6), (5, 11, 2, 1, 3)])
def test_prompt_contribution(monkeypatch, group_bytes, length, num_steps, streams, batch,
                             width):
  rng = np.random.default_rng(length * num_steps)
  inputs = rng.standard_normal((length, streams, batch, width)).astype(np.float32)
  taps = (rng.standard_normal((length + num_steps + 2, streams, width))
          / np.sqrt(length)).astype(np.float32)
  if group_bytes is not None:  # one channel per group
    monkeypatch.setattr(convolution, "SPECTRUM_GROUP_BYTES", group_bytes)
  # a new function each time: jit would reuse a trace made under the other group size
  fn = jax.jit(lambda x, h: prompt_lib.prompt_contribution(x, h, num_steps))
  hlo = fn.lower(inputs, taps).as_text()
  grouped = group_bytes is not None and length > prompt_lib.DIRECT_PROMPT_MAX
  assert ("while" in hlo) == grouped
  got = np.asarray(fn(inputs, taps))
  want = _expected(inputs, taps, num_steps)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
