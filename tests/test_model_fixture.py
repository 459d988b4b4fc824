"""The Flax model reproduces the HyenaDNA reference fixture's parallel-forward logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lcsm_jax.checkpoint import load_hyenadna
from lcsm_jax.model import HyenaLM
from numpy_reference import hyenadna_logits


def _relative_error(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("long_conv", ["fft", "direct"])
@pytest.mark.parametrize("length", [1, 2, 37, 300])
def test_float32_forward_matches_fixture(fixture_dir, fixture_reference, long_conv, length):
  config, params = load_hyenadna(fixture_dir)
  ids = fixture_reference["forward_input_ids"][:, :length]
  logits = HyenaLM(config, long_conv=long_conv).apply(params, jnp.asarray(ids))
  chex.assert_shape(logits, ids.shape + (config.padded_vocab_size,))
  chex.assert_type(logits, jnp.float32)
  assert _relative_error(logits, fixture_reference["forward_logits"][:, :length]) <= 1e-4
