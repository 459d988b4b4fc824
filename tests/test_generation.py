"""Generation from the Hyena language model: every strategy is exact.

References: the HyenaDNA fixture (PyTorch, float64) and, for random models, the independent
float64 NumPy forward with direct O(L^2) convolutions (`numpy_reference.py`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import decoding
from lcsm_jax.io.hyenadna import load_hyenadna
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.params import init_params
from numpy_reference import hyenadna_logits
from state_dict_helpers import reference_config, state_dict_from_params

STRATEGIES = ["flash", "lazy", "eager", "recompute"]
SMALL_ENGINE = dict(tau=4, chunk=16)  # exercise direct and FFT blocks and several chunks


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fixture_model(fixture_dir):
  return load_hyenadna(fixture_dir)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fixture_teacher_forced_logits(fixture_model, fixture_reference, strategy):
  config, params = fixture_model
  prompt = fixture_reference["prompt_ids"]
  generated = fixture_reference["generated_ids"]
  tokens = np.concatenate([prompt, generated[:, :-1]], axis=1)
  logits = decoding.teacher_forced_logits(params, config, tokens,
                                            prompt_length=prompt.shape[1], strategy=strategy,
                                            **SMALL_ENGINE)
  chex.assert_shape(logits, tokens.shape + (config.padded_vocab_size,))
  step_logits = np.asarray(logits)[:, prompt.shape[1] - 1:, :config.vocab_size]
  assert relative_error(step_logits, fixture_reference["generated_step_logits"]) <= 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fixture_sampling_reproduces_generated_ids(fixture_model, fixture_reference, strategy):
  config, params = fixture_model
  out = decoding.generate(params, config, fixture_reference["prompt_ids"], 219,
                            gumbel_noise=fixture_reference["gumbel_noise"], strategy=strategy,
                            return_logits=True, **SMALL_ENGINE)
  np.testing.assert_array_equal(out.tokens, fixture_reference["generated_ids"])
  np.testing.assert_array_equal(out.lengths, [219, 219])
  assert relative_error(out.logits, fixture_reference["generated_step_logits"]) <= 1e-4


RANDOM_MODELS = [
    # (order, d_model, n_layer, batch, total length, prompt length)
    (2, 16, 2, 1, 45, 0),
    (2, 24, 3, 2, 64, 1),
    (3, 8, 2, 3, 50, 7),
    (3, 16, 1, 1, 33, 32),   # a single online step after a long prompt
]


@pytest.fixture(scope="module", params=RANDOM_MODELS, ids=lambda p: "order{}-d{}-l{}-b{}-L{}-P{}".format(*p))
def random_case(request):
  order, width, layers, batch, total, prompt_len = request.param
  config = HyenaConfig(vocab_size=11, d_model=width, n_layer=layers, d_inner=2 * width,
                       l_max=total + 3, order=order, filter_order=16, emb_dim=3,
                       pad_vocab_size_multiple=4)
  params = init_params(config, jax.random.key(width * 10 + order))
  tokens = np.random.default_rng(total).integers(0, config.vocab_size, (batch, total))
  state = state_dict_from_params(config, params)
  reference = hyenadna_logits(state, reference_config(config), tokens)
  return config, params, tokens, prompt_len, reference


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_models_teacher_forced_match_direct_reference(random_case, strategy):
  config, params, tokens, prompt_len, reference = random_case
  logits = decoding.teacher_forced_logits(params, config, tokens, prompt_length=prompt_len,
                                            strategy=strategy, **SMALL_ENGINE)
  assert relative_error(logits, reference) <= 1e-4


@pytest.mark.parametrize("num_tokens", [1, 2, 29])
def test_strategies_sample_identical_tokens(num_tokens):
  config = HyenaConfig(vocab_size=13, d_model=16, n_layer=2, d_inner=32, l_max=64, order=3,
                       filter_order=16, emb_dim=3)
  params = init_params(config, jax.random.key(5))
  prompt = np.random.default_rng(0).integers(0, 13, (2, 5))
  key = jax.random.key(42)
  results = {s: decoding.generate(params, config, prompt, num_tokens, key, strategy=s,
                                    return_logits=True, **SMALL_ENGINE) for s in STRATEGIES}
  for strategy in STRATEGIES[1:]:
    np.testing.assert_array_equal(results[strategy].tokens, results["flash"].tokens)
  # The sampled continuation is what the parallel forward says: its logits at every step.
  flash = results["flash"]
  full = np.concatenate([prompt, np.asarray(flash.tokens)], axis=1)
  forward = np.asarray(HyenaLM(config).apply(params, full))[:, 4:-1, :13]
  assert relative_error(flash.logits, forward) <= 1e-4


def test_pallas_blocks_generate_exactly():
  """tau='pallas' (the Pallas kernel, interpreted on CPU) in the language model's engine."""
  config = HyenaConfig(vocab_size=7, d_model=8, n_layer=2, d_inner=16, l_max=40, order=3,
                       filter_order=8, emb_dim=3)
  params = init_params(config, jax.random.key(11))
  tokens = np.random.default_rng(3).integers(0, 7, (1, 37))
  reference = hyenadna_logits(state_dict_from_params(config, params), reference_config(config),
                              tokens)
  logits = decoding.teacher_forced_logits(params, config, tokens, prompt_length=5,
                                            strategy="flash", tau="pallas")
  assert relative_error(logits, reference) <= 1e-4


@pytest.mark.parametrize("smooth", [True, 1])
def test_fixture_sampling_with_the_smoothed_schedule(fixture_model, fixture_reference, smooth):
  """219 steps in base 4: with tau=4, FFT levels 16 and 64, and smooth=True spreads level 64
  over the steps before its blocks (bridge 16); with tau=1, smooth=1 spreads 16 and 64
  (bridge 4)."""
  config, params = fixture_model
  out = decoding.generate(params, config, fixture_reference["prompt_ids"], 219,
                            gumbel_noise=fixture_reference["gumbel_noise"], return_logits=True,
                            **dict(SMALL_ENGINE, smooth=smooth, tau=4 if smooth is True else 1))
  np.testing.assert_array_equal(out.tokens, fixture_reference["generated_ids"])
  assert relative_error(out.logits, fixture_reference["generated_step_logits"]) <= 1e-4


def test_random_models_with_the_smoothed_schedule(random_case):
  config, params, tokens, prompt_len, reference = random_case
  logits = decoding.teacher_forced_logits(params, config, tokens, prompt_length=prompt_len,
                                            smooth=1, tau=1)
  assert relative_error(logits, reference) <= 1e-4
