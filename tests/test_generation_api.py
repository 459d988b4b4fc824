"""The public `generate` API: clear errors on bad input, and the sampling options."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import decoding
from lcsm_jax.decoding import memory
from lcsm_jax.decoding import sampling
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.params import init_params

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
    decoding.generate(params, CONFIG, prompt, num_tokens, jax.random.key(1), **kwargs)


def test_sampling_without_key_is_refused(params):
  with pytest.raises(ValueError, match="PRNG key"):
    decoding.generate(params, CONFIG, PROMPT, 3, None)


def test_parameters_of_another_config_are_refused(params):
  other = CONFIG.replace(d_model=16, d_inner=32)
  with pytest.raises(ValueError, match="d_model|shape|match"):
    decoding.generate(init_params(other, jax.random.key(0)), CONFIG, PROMPT, 3,
                        jax.random.key(1))
  with pytest.raises(ValueError, match="d_model|shape|match"):
    decoding.teacher_forced_logits(params, other, PROMPT)


def test_same_key_same_tokens_other_key_other_tokens(params):
  run = lambda seed: np.asarray(decoding.generate(
      params, CONFIG, PROMPT, 20, jax.random.key(seed), temperature=2.0, **ENGINE).tokens)
  np.testing.assert_array_equal(run(7), run(7))
  assert (run(7) != run(8)).any()


def test_greedy_top_k_1_and_tiny_top_p_agree(params):
  greedy = decoding.generate(params, CONFIG, PROMPT, 12, temperature=0.0, **ENGINE)
  top_k = decoding.generate(params, CONFIG, PROMPT, 12, jax.random.key(3), top_k=1, **ENGINE)
  top_p = decoding.generate(params, CONFIG, PROMPT, 12, jax.random.key(4), top_p=1e-6,
                              **ENGINE)
  np.testing.assert_array_equal(top_k.tokens, greedy.tokens)
  np.testing.assert_array_equal(top_p.tokens, greedy.tokens)


def test_rows_stop_at_the_end_token(params):
  free = np.asarray(decoding.generate(params, CONFIG, PROMPT, 15, temperature=0.0,
                                        **ENGINE).tokens)
  eos = int(free[0, 4])
  out = decoding.generate(params, CONFIG, PROMPT, 15, temperature=0.0, eos_id=eos, **ENGINE)
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
      logits, cfg, temperature, 1.0, sampling.step_noise(k[None], 0, 5))[0]))
  tokens = np.asarray(choose(jax.random.split(jax.random.key(0), draws)))
  freq = np.bincount(tokens, minlength=5) / draws
  probs = np.exp(logits[0] / temperature)
  probs /= probs.sum()
  tolerance = 4 * np.sqrt(probs * (1 - probs) / draws) + 1e-3  # four standard errors
  assert (np.abs(freq - probs) <= tolerance).all(), (freq, probs)


def test_on_token_streams_every_token_in_order(params):
  seen = []
  out = decoding.generate(params, CONFIG, PROMPT, 9, jax.random.key(2),
                            on_token=lambda j, tokens: seen.append((int(j), np.asarray(tokens))),
                            **ENGINE)
  assert [j for j, _ in seen] == list(range(9))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out.tokens)


def test_tiny_temperatures_are_greedy_and_huge_ones_warn_nothing(params):
  greedy = decoding.generate(params, CONFIG, PROMPT, 10, temperature=0.0, **ENGINE).tokens
  for temperature in (1e-40, 1e-30, 1e-12, np.float32(1e-40)):
    tiny = decoding.generate(params, CONFIG, PROMPT, 10, jax.random.key(5),
                               temperature=temperature, **ENGINE).tokens
    np.testing.assert_array_equal(tiny, greedy, err_msg=f"temperature {temperature}")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    hot = decoding.generate(params, CONFIG, PROMPT, 10, jax.random.key(5), temperature=1e300,
                              **ENGINE).tokens
  assert ((0 <= np.asarray(hot)) & (np.asarray(hot) < CONFIG.vocab_size)).all()


def test_huge_temperature_samples_uniformly_among_the_kept_tokens():
  logits = np.array([[30.0, 10.0, 0.0, -10.0, -30.0, 5.0]], np.float32)
  draws = 12000
  for top_k, kept in ((None, 6), (3, 3)):
    cfg = sampling.SamplingConfig(6, top_k=top_k)
    temperature = sampling.check_temperature(1e300)
    choose = jax.jit(jax.vmap(lambda k: sampling.choose(
        logits, cfg, temperature, 1.0, sampling.step_noise(k[None], 0, 6))[0]))
    tokens = np.asarray(choose(jax.random.split(jax.random.key(1), draws)))
    freq = np.bincount(tokens, minlength=6) / draws
    allowed = np.argsort(-logits[0])[:kept]
    np.testing.assert_allclose(freq[allowed], 1 / kept, atol=4 * np.sqrt(1 / kept / draws))
    assert freq.sum() == pytest.approx(freq[allowed].sum())


def test_top_p_at_tiny_temperature_keeps_only_the_best_token():
  logits = np.array([[1.0, 3.0, 2.999, -5.0]], np.float32)
  cfg = sampling.SamplingConfig(4, use_top_p=True)
  kept = sampling.filter_logits(logits, cfg, 0.9, sampling.check_temperature(1e-40))
  np.testing.assert_array_equal(np.isfinite(np.asarray(kept)), [[False, True, False, False]])


@pytest.mark.parametrize("temperature,error,match", [
    (float("nan"), ValueError, "temperature must be >= 0"),
    (-1e-9, ValueError, "temperature must be >= 0"),
    ("hot", TypeError, "temperature must be a real number"),
    (True, TypeError, "temperature must be a real number"),
])
def test_bad_temperatures_are_refused(params, temperature, error, match):
  with pytest.raises(error, match=match):
    decoding.generate(params, CONFIG, PROMPT, 3, jax.random.key(1), temperature=temperature)


def test_jax_scalar_options_are_accepted(params):
  plain = decoding.generate(params, CONFIG, PROMPT, 8, jax.random.key(2), temperature=0.5,
                              **ENGINE).tokens
  scalar = decoding.generate(params, CONFIG, PROMPT, 8, jax.random.key(2),
                               temperature=jnp.float32(0.5), **ENGINE).tokens
  np.testing.assert_array_equal(scalar, plain)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(eos_id=True), ValueError, "eos_id must be an integer token id"),
    (dict(eos_id=np.bool_(False)), ValueError, "eos_id must be an integer token id"),
    (dict(strategy="eager", chunk=-1), ValueError, "chunk must be a power of two"),
    (dict(strategy="lazy", chunk=0), ValueError, "chunk must be a power of two"),
    (dict(chunk=2.0), TypeError, "chunk must be an integer"),
    (dict(smooth=0), ValueError, "smooth must be 'auto', True, False or a block size >= 1"),
    (dict(smooth=2.5), ValueError, "smooth must be 'auto', True, False or a block size >= 1"),
    (dict(smooth="yes"), ValueError, "smooth must be 'auto', True, False or a block size >= 1"),
    (dict(row_keys=jax.random.split(jax.random.key(0), 3)), ValueError, "one key per row"),
    (dict(row_keys=np.zeros((2,), np.float32)), TypeError, "row_keys must be"),
])
def test_bad_sampling_and_engine_options_are_refused(params, kwargs, error, match):
  with pytest.raises(error, match=match):
    decoding.generate(params, CONFIG, PROMPT, 3, **({"key": None} if "row_keys" in kwargs
                                                      else {"key": jax.random.key(1)}), **kwargs)


def test_non_finite_parameters_are_refused_unless_allowed(params):
  broken = jax.tree.map(np.array, params)
  broken["params"]["ln_f"]["scale"][3] = np.nan
  broken["params"]["stack"]["blocks"]["mixer"]["filter"]["bias"][0, 1] = np.inf
  for run in (lambda **kw: decoding.generate(broken, CONFIG, PROMPT, 3, jax.random.key(1), **kw),
              lambda **kw: decoding.teacher_forced_logits(broken, CONFIG, PROMPT, **kw)):
    with pytest.raises(ValueError, match=r"(?s)non-finite.*(filter/bias.*params/ln_f/scale|"
                       r"params/ln_f/scale.*filter/bias)"):
      run()
    run(check_finite=False)  # the user's choice: runs (NaN logits are then theirs)


def test_a_row_samples_the_same_tokens_whatever_its_batch():
  """Row b's noise comes from (key, b, step): the same alone, in a larger batch, and, with
  row_keys, wherever the row sits."""
  params = init_params(CONFIG, jax.random.key(0))
  prompts = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  run = lambda prompt, **kw: np.asarray(decoding.generate(
      params, CONFIG, prompt, 12, temperature=1.5, **ENGINE, **kw).tokens)
  key = jax.random.key(11)
  batch = run(prompts, key=key)
  np.testing.assert_array_equal(run(prompts[:2], key=key), batch[:2])
  keys = sampling.row_keys(key, 3)
  for b in range(3):
    np.testing.assert_array_equal(run(prompts[b:b + 1], row_keys=keys[b:b + 1]), batch[b:b + 1])
  np.testing.assert_array_equal(run(prompts[::-1], row_keys=keys[::-1]), batch[::-1])
  assert len({tuple(row) for row in batch}) == 3  # really sampled


def test_the_hosts_available_memory_is_read_at_most_once_a_second(monkeypatch):
  """Streamed generation checks memory at every call; the OS's figure serves a second."""
  readings, clock = iter([5_000, 7_000]), [100.0]
  monkeypatch.setattr(memory, "_read_host_available_bytes", lambda: next(readings))
  monkeypatch.setattr(memory.time, "monotonic", lambda: clock[0])
  monkeypatch.setattr(memory, "_host_reading", None)
  assert memory._host_available_bytes() == 5_000  # pylint: disable=protected-access
  clock[0] += memory.HOST_READING_SECONDS / 2
  assert memory._host_available_bytes() == 5_000  # pylint: disable=protected-access
  clock[0] += memory.HOST_READING_SECONDS
  assert memory._host_available_bytes() == 7_000  # pylint: disable=protected-access


def test_a_run_that_cannot_fit_is_refused_before_it_starts(params, monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: (10_000, "a test limit"))
  with pytest.raises(memory.InsufficientMemoryError,
                     match=r"needs an estimated .*filter tables and their computation .*prefill "
                     r"\(state included\) .*generation .*"
                     r"more than the 9.8 KiB of a test limit; reduce the batch size.*"
                     r"check_memory=False"):
    decoding.generate(params, CONFIG, PROMPT, 5, jax.random.key(1), **ENGINE)
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: (1_000, "a test limit"))
  with pytest.raises(memory.InsufficientMemoryError, match="score fewer"):
    decoding.teacher_forced_logits(params, CONFIG, PROMPT)
  out = decoding.generate(params, CONFIG, PROMPT, 5, jax.random.key(1), check_memory=False,
                            **ENGINE)
  assert out.tokens.shape == (2, 5)


def test_a_state_larger_than_the_host_is_refused_without_running():
  """Flash rings of 2^19 rows for 40,000 rows of 2 x 8 channels: terabytes; refused from the
  compiled program's memory analysis, nothing allocated."""
  config = CONFIG.replace(l_max=1 << 20)
  params = init_params(config, jax.random.key(0))
  prompt = np.ones((40_000, 1), np.int32)
  with pytest.raises(memory.InsufficientMemoryError, match=r"needs an estimated [0-9.]+ TiB"):
    decoding.generate(params, config, prompt, (1 << 20) - 1, temperature=0.0)
