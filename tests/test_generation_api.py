"""The public `generate` API: clear errors on bad input, and the sampling options."""

import jax
import numpy as np
import pytest

from lcsm_jax import generation
from lcsm_jax import sampling
from lcsm_jax.config import HyenaConfig
from lcsm_jax.model import init_params

CONFIG = HyenaConfig(vocab_size=13, d_model=8, n_layer=2, d_inner=16, l_max=40, order=2,
                     filter_order=8, emb_dim=3)
ENGINE = dict(tau=2, chunk=8)


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("prompt,num_tokens,kwargs,error,match", [
    (np.zeros((1, 30), int), 12, {}, ValueError, "exceeds the model's maximum length"),
    (np.zeros((1, 41), int), 1, {}, ValueError, "l_max|longer|exceeds"),
    (PROMPT, 0, {}, ValueError, "num_tokens must be an integer >= 1"),
    (PROMPT, 2.5, {}, ValueError, "num_tokens must be an integer >= 1"),
    (PROMPT.astype(float), 3, {}, TypeError, "integer"),
    (PROMPT + 10, 3, {}, ValueError, r"\[0, 13\)"),
    (-PROMPT, 3, {}, ValueError, r"\[0, 13\)"),
    (PROMPT[0], 3, {}, ValueError, r"\(batch, length\)"),
    (PROMPT, 3, dict(strategy="fastest"), ValueError, "unknown strategy"),
    (PROMPT, 3, dict(temperature=-1.0), ValueError, "temperature"),
    (PROMPT, 3, dict(top_p=1.5), ValueError, "top_p"),
    (PROMPT, 3, dict(top_k=0), ValueError, "top_k"),
    (PROMPT, 3, dict(eos_id=13), ValueError, "eos_id"),
    (PROMPT, 3, dict(tau="fastest"), ValueError, "tau must be"),
    (PROMPT, 3, dict(taus=4), TypeError, "unknown engine option"),
])
def test_bad_input_gets_a_clear_error(params, prompt, num_tokens, kwargs, error, match):
  with pytest.raises(error, match=match):
    generation.generate(params, CONFIG, prompt, num_tokens, jax.random.key(1), **kwargs)


def test_sampling_without_key_is_refused(params):
  with pytest.raises(ValueError, match="PRNG key"):
    generation.generate(params, CONFIG, PROMPT, 3, None)


def test_parameters_of_another_config_are_refused(params):
  other = CONFIG.replace(d_model=16, d_inner=32)
  with pytest.raises(ValueError, match="d_model|shape|match"):
    generation.generate(init_params(other, jax.random.key(0)), CONFIG, PROMPT, 3,
                        jax.random.key(1))
  with pytest.raises(ValueError, match="d_model|shape|match"):
    generation.teacher_forced_logits(params, other, PROMPT)


def test_same_key_same_tokens_other_key_other_tokens(params):
  run = lambda seed: np.asarray(generation.generate(
      params, CONFIG, PROMPT, 20, jax.random.key(seed), temperature=2.0, **ENGINE).tokens)
  np.testing.assert_array_equal(run(7), run(7))
  assert (run(7) != run(8)).any()


def test_greedy_top_k_1_and_tiny_top_p_agree(params):
  greedy = generation.generate(params, CONFIG, PROMPT, 12, temperature=0.0, **ENGINE)
  top_k = generation.generate(params, CONFIG, PROMPT, 12, jax.random.key(3), top_k=1, **ENGINE)
  top_p = generation.generate(params, CONFIG, PROMPT, 12, jax.random.key(4), top_p=1e-6,
                              **ENGINE)
  np.testing.assert_array_equal(top_k.tokens, greedy.tokens)
  np.testing.assert_array_equal(top_p.tokens, greedy.tokens)


def test_rows_stop_at_the_end_token(params):
  free = np.asarray(generation.generate(params, CONFIG, PROMPT, 15, temperature=0.0,
                                        **ENGINE).tokens)
  eos = int(free[0, 4])
  out = generation.generate(params, CONFIG, PROMPT, 15, temperature=0.0, eos_id=eos, **ENGINE)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row in range(2):
    hits = np.flatnonzero(free[row] == eos)
    want = hits[0] + 1 if hits.size else 15
    assert lengths[row] == want
    np.testing.assert_array_equal(tokens[row, :want], free[row, :want])
    assert (tokens[row, want:] == eos).all()


def _filter_reference(logits, top_k, top_p):
  """NumPy: keep the top-k, then the smallest most-likely set with mass >= top_p."""
  keep = np.ones_like(logits, bool)
  if top_k is not None:
    keep &= logits >= np.sort(logits)[-top_k]
  masked = np.where(keep, logits, -np.inf)
  if top_p is not None:
    order = np.argsort(-masked)
    probs = np.exp(masked[order] - masked[order[0]])
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    keep_p = np.zeros_like(keep)
    keep_p[order] = mass_before < top_p
    keep &= keep_p
  return keep


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.5), (5, 0.8),
                                         (1, None), (None, 1.0)])
def test_filter_logits_matches_reference(top_k, top_p):
  rng = np.random.default_rng(top_k or 0)
  logits = rng.standard_normal((4, 11)).astype(np.float32) * 2
  cfg = sampling.SamplingConfig(11, top_k=top_k, use_top_p=top_p is not None)
  got = np.isfinite(np.asarray(sampling.filter_logits(logits, cfg, top_p or 1.0)))
  want = np.stack([_filter_reference(row, top_k, top_p) for row in logits])
  np.testing.assert_array_equal(got, want)


def test_sampling_frequencies_follow_the_tempered_softmax():
  logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5]], np.float32)
  temperature, draws = 0.7, 20000
  cfg = sampling.SamplingConfig(5)
  choose = jax.jit(jax.vmap(lambda k: sampling.choose(
      logits, cfg, temperature, 1.0, sampling.gumbel_noise(k, 0, (1, 5)))[0]))
  tokens = np.asarray(choose(jax.random.split(jax.random.key(0), draws)))
  freq = np.bincount(tokens, minlength=5) / draws
  probs = np.exp(logits[0] / temperature)
  probs /= probs.sum()
  tolerance = 4 * np.sqrt(probs * (1 - probs) / draws) + 1e-3  # four standard errors
  assert (np.abs(freq - probs) <= tolerance).all(), (freq, probs)


def test_on_token_streams_every_token_in_order(params):
  seen = []
  out = generation.generate(params, CONFIG, PROMPT, 9, jax.random.key(2),
                            on_token=lambda j, tokens: seen.append((int(j), np.asarray(tokens))),
                            **ENGINE)
  assert [j for j, _ in seen] == list(range(9))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out.tokens)
