"""`Decoder`: resumable generation. Continuing a state in chunks gives exactly the tokens of one
call, for every strategy; `score` equals the parallel forward; states of other decoders and
continuations past max_length are refused before any work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import decoding
from lcsm_jax.decoding import sampling
from lcsm_jax.models.hyena import HyenaConfig, HyenaLM, init_params

CONFIG = HyenaConfig(vocab_size=13, d_model=8, n_layer=2, d_inner=16, l_max=48, order=2,
                     filter_order=8, emb_dim=3)
ENGINE = dict(tau=2, chunk=8)
PROMPTS = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [4, 5, 6, 7, 8, 9, 10, 11, 12, 0],
                    [7, 8, 9, 10, 11, 12, 0, 1, 2, 3]])


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


def _chunks(decoder, state, sizes, key, **kwargs):
  outs = []
  for size in sizes:
    out, state = decoder.generate(state, size, key, **kwargs)
    outs.append(out)
  return (np.concatenate([np.asarray(o.tokens) for o in outs], axis=1),
          np.sum([np.asarray(o.lengths) for o in outs], axis=0), state)


@pytest.mark.parametrize("strategy", decoding.EXACT_STRATEGIES)
@pytest.mark.parametrize("prompt_length", [3, 10])
def test_chunks_equal_one_call(params, strategy, prompt_length):
  """Chunks of 5, 10, 5 and of 10, 10 give the 20 tokens of one call, with and without an end
  token; prompts shorter and longer than the 8 positions flash adds by products."""
  prompt = PROMPTS[:, :prompt_length]
  decoder = decoding.Decoder(params, CONFIG, strategy, max_length=prompt_length + 20,
                             **ENGINE)
  key = jax.random.key(4)
  whole, whole_lengths, whole_state = _chunks(decoder, decoder.prefill(prompt), [20], key,
                                              temperature=1.3)
  assert len({tuple(row) for row in whole}) == 3 and len(set(whole.ravel())) > 4
  for sizes in ([5, 10, 5], [10, 10]):
    tokens, lengths, state = _chunks(decoder, decoder.prefill(prompt), sizes, key,
                                     temperature=1.3)
    np.testing.assert_array_equal(tokens, whole, err_msg=f"{strategy} {sizes}")
    np.testing.assert_array_equal(lengths, whole_lengths)
    assert int(state.length) == int(whole_state.length) == prompt_length + 20
    assert int(state.step) == 20
  eos = int(whole[1, 6])  # row 1 ends at its 7th token (or earlier)
  with_eos, eos_lengths, _ = _chunks(decoder, decoder.prefill(prompt), [20], key,
                                     temperature=1.3, eos_id=eos)
  tokens, lengths, state = _chunks(decoder, decoder.prefill(prompt), [5, 10, 5], key,
                                   temperature=1.3, eos_id=eos)
  np.testing.assert_array_equal(tokens, with_eos)
  np.testing.assert_array_equal(lengths, eos_lengths)
  assert eos_lengths[1] <= 7 and (with_eos[1, eos_lengths[1] - 1:] == eos).all()
  np.testing.assert_array_equal(np.asarray(state.done), (with_eos == eos).any(axis=1))


def test_generation_is_the_argmax_of_the_parallel_forward(params):
  """Greedy continuation in chunks: every token is the argmax of HyenaLM.apply over the
  sequence so far (an independent check of the continued state)."""
  decoder = decoding.Decoder(params, CONFIG, "flash", **ENGINE)
  state = decoder.prefill(PROMPTS[:, :4])
  tokens = []
  for size in (3, 1, 6):
    out, state = decoder.generate(state, size, temperature=0)
    tokens.append(np.asarray(out.tokens))
  sequence = np.concatenate([PROMPTS[:, :4]] + tokens, axis=1)
  logits = np.asarray(HyenaLM(CONFIG).apply(params, sequence))[..., :CONFIG.vocab_size]
  np.testing.assert_array_equal(sequence[:, 4:], logits[:, 3:-1].argmax(-1))


@pytest.mark.parametrize("strategy", decoding.EXACT_STRATEGIES)
def test_score_equals_the_parallel_forward(params, strategy):
  decoder = decoding.Decoder(params, CONFIG, strategy, max_length=30, **ENGINE)
  ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 30))
  want = np.asarray(HyenaLM(CONFIG).apply(params, ids))
  prompt_logits, state = decoder.prefill(ids[:, :9], return_logits=True)
  first, state = decoder.score(state, ids[:, 9:20])
  second, state = decoder.score(state, ids[:, 20:])
  got = np.concatenate([prompt_logits, first, second], axis=1)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(state.logits), want[:, -1], rtol=2e-4, atol=2e-4)
  assert int(state.length) == 30
  # from an empty prompt, token by token
  empty = decoder.prefill(np.zeros((2, 0), np.int32))
  logits, _ = decoder.score(empty, ids[:, :12])
  np.testing.assert_allclose(logits, want[:, :12], rtol=2e-4, atol=2e-4)


def test_scoring_then_generating_samples_from_the_scored_position(params):
  decoder = decoding.Decoder(params, CONFIG, "flash", **ENGINE)
  state = decoder.prefill(PROMPTS[:, :3])
  _, state = decoder.score(state, PROMPTS[:, 3:7])
  out, _ = decoder.generate(state, 5, temperature=0)
  direct, _ = decoder.generate(decoder.prefill(PROMPTS[:, :7]), 5, temperature=0)
  np.testing.assert_array_equal(out.tokens, direct.tokens)


def test_a_state_can_be_continued_several_ways_unless_donated(params):
  decoder = decoding.Decoder(params, CONFIG, "flash", **ENGINE)
  state = decoder.prefill(PROMPTS)
  a, _ = decoder.generate(state, 6, jax.random.key(1))
  b, _ = decoder.generate(state, 6, jax.random.key(1))
  c, _ = decoder.generate(state, 6, jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  donating = decoding.Decoder(params, CONFIG, "flash", donate_state=True, **ENGINE)
  state = donating.prefill(PROMPTS)
  d, _ = donating.generate(state, 6, jax.random.key(1))
  np.testing.assert_array_equal(d.tokens, a.tokens)
  with pytest.raises(RuntimeError, match="deleted|donated"):
    donating.generate(state, 6, jax.random.key(1))


def test_states_of_other_decoders_are_refused(params):
  decoder = decoding.Decoder(params, CONFIG, "flash", max_length=40, **ENGINE)
  state = decoder.prefill(PROMPTS)
  for other, match in [
      (decoding.Decoder(params, CONFIG, "lazy", max_length=40, **ENGINE), "strategy 'flash'"),
      (decoding.Decoder(params, CONFIG, "flash", max_length=41, **ENGINE), "max_length 40"),
      (decoding.Decoder(init_params(CONFIG.replace(d_inner=24), jax.random.key(0)),
                        CONFIG.replace(d_inner=24), "flash", max_length=40, **ENGINE),
       "model"),
  ]:
    with pytest.raises(ValueError, match=f"belongs to another decoder: .*{match}"):
      other.generate(state, 2, temperature=0)
    with pytest.raises(ValueError, match="belongs to another decoder"):
      other.score(state, PROMPTS[:, :2])
  with pytest.raises(TypeError, match="DecodeState"):
    decoder.generate({"logits": 0}, 2, temperature=0)
  same = decoding.Decoder(params, CONFIG, "flash", max_length=40, **ENGINE)
  np.testing.assert_array_equal(same.generate(state, 3, temperature=0)[0].tokens,
                                decoder.generate(state, 3, temperature=0)[0].tokens)


def test_continuations_past_max_length_are_refused_before_any_work(params, monkeypatch):
  decoder = decoding.Decoder(params, CONFIG, "flash", max_length=16, **ENGINE)
  state = decoder.prefill(PROMPTS)  # 10 tokens
  empty = decoder.prefill(np.zeros((3, 0), np.int32))
  calls = []
  monkeypatch.setattr(decoder, "compiled", lambda *a, **k: calls.append(a) or 1 / 0)
  with pytest.raises(ValueError, match="cannot generate 8 tokens after 10: that needs 17 "
                     "positions, more than max_length = 16"):
    decoder.generate(state, 8, temperature=0)
  with pytest.raises(ValueError, match="cannot score 7 tokens after 10"):
    decoder.score(state, np.ones((3, 7), np.int32))
  with pytest.raises(ValueError, match="token_ids has 2 rows, the state 3"):
    decoder.score(state, np.ones((2, 1), np.int32))
  with pytest.raises(ValueError, match="no token to continue from"):
    decoder.generate(empty, 1, temperature=0)
  assert not calls  # refused before compiling anything
  monkeypatch.undo()
  out, final = decoder.generate(state, 7, temperature=0)  # 10 + 7 - 1 = 16: the last not fed
  assert int(final.length) == 17 and out.tokens.shape == (3, 7)
  with pytest.raises(ValueError, match="the state is final"):
    decoder.generate(final, 1, temperature=0)
  with pytest.raises(ValueError, match=r"prompt_ids has length 17, more than the allowed "
                     r"maximum max_length = 16"):
    decoder.prefill(np.ones((1, 17), np.int32))


def test_the_last_token_fits_exactly_at_l_max(params):
  """A prompt of l_max - 3 and 4 tokens: positions up to l_max - 1 are fed, the 4th token is
  sampled from the logits at l_max - 1 (as `generate` has always allowed)."""
  decoder = decoding.Decoder(params, CONFIG, "flash", **ENGINE)
  prompt = np.ones((1, CONFIG.l_max - 3), np.int32)
  a, state = decoder.generate(decoder.prefill(prompt), 2, temperature=0)
  b, state = decoder.generate(state, 2, temperature=0)
  one = lcsm_jax.generate(params, CONFIG, prompt, 4, temperature=0, **ENGINE)
  np.testing.assert_array_equal(np.concatenate([a.tokens, b.tokens], axis=1), one.tokens)


def test_row_keys_and_explicit_noise_continue_by_absolute_step(params):
  decoder = decoding.Decoder(params, CONFIG, "lazy", **ENGINE)
  keys = jax.random.split(jax.random.key(9), 3)
  one, _ = decoder.generate(decoder.prefill(PROMPTS), 8, row_keys=keys, temperature=2.0)
  state = decoder.prefill(PROMPTS)
  first, state = decoder.generate(state, 3, row_keys=keys, temperature=2.0)
  second, _ = decoder.generate(state, 5, row_keys=keys, temperature=2.0)
  np.testing.assert_array_equal(np.concatenate([first.tokens, second.tokens], 1), one.tokens)
  noise = np.asarray(jax.vmap(lambda s: sampling.step_noise(keys, s, 13), out_axes=1)(
      jnp.arange(8)))
  state = decoder.prefill(PROMPTS)
  first, state = decoder.generate(state, 3, gumbel_noise=noise[:, :3], temperature=2.0)
  second, _ = decoder.generate(state, 5, gumbel_noise=noise[:, 3:], temperature=2.0)
  np.testing.assert_array_equal(np.concatenate([first.tokens, second.tokens], 1), one.tokens)


def test_every_registered_strategy_implements_the_interface():
  from lcsm_jax.decoding import strategies
  from lcsm_jax.decoding.interfaces import Strategy
  assert lcsm_jax.STRATEGIES == decoding.STRATEGIES == tuple(strategies.REGISTRY)
  for name in strategies.STRATEGIES:
    strategy = strategies.create(name, decoding.EngineOptions(tau=4))
    assert isinstance(strategy, Strategy) and strategy.name == name
    assert strategy.exact == (name != "modal")
    hash(strategy)  # a static argument of the compiled programs
  assert decoding.EXACT_STRATEGIES == ("flash", "lazy", "eager", "recompute")
  with pytest.raises(ValueError, match="unknown strategy 'fastest'; choose one of"):
    strategies.create("fastest")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_length=49), ValueError, r"max_length must be an integer in \[1, 48\]"),
    (dict(max_length=0), ValueError, "max_length must be"),
    (dict(strategy="fastest"), ValueError, "unknown strategy"),
    (dict(taus=3), TypeError, "unknown engine option"),
    (dict(tau="quick"), ValueError, "tau must be"),
])
def test_bad_decoder_arguments(params, kwargs, error, match):
  with pytest.raises(error, match=match):
    decoding.Decoder(params, CONFIG, **kwargs)


def test_memory_estimates_run_nothing(params):
  decoder = decoding.Decoder(params, CONFIG, "flash", max_length=40, **ENGINE)
  parts = decoder.estimate_memory(3, 5, num_tokens=10, score_tokens=4)
  assert set(parts) == {"parameters", "filter tables and their computation",
                        "prefill (state included)", "generation", "scoring"}
  assert all(v > 0 for v in parts.values())
  state = decoder.state_shape(3, 5)
  assert isinstance(state.logits, jax.ShapeDtypeStruct) and state.logits.shape == (3, 16)
  # flash (base 4) keeps channel-major rings of its largest block size, 16 positions for
  # M = 35 online positions, staging buffers of one tile (tau=2: the FFT levels start at 4)
  # and the spectra of the input blocks of the current group (two slots of U + 1 = 17 values
  # for the top level, whose group has blocks 0, 1, 2 below M)
  strategy_state = state.engine.strategy
  assert strategy_state.inputs.shape == (2, 3, 8, 16)
  assert strategy_state.staged_inputs.shape == (4, 2, 3, 8)
  assert {u: x.shape for u, x in strategy_state.input_spectra.items()} == {
      4: (2, 2, 3, 8, 5), 16: (1, 2, 3, 8, 17)}
  assert decoder._tables is None  # pylint: disable=protected-access


@pytest.mark.parametrize("options", [dict(temperature=0.0),
                                     dict(temperature=0.7, top_k=5),
                                     dict(temperature=1.0, top_p=0.9, eos_id=3)])
def test_the_memory_check_compiles_the_program_that_then_runs(params, options):
  decoder = decoding.Decoder(params, CONFIG, "flash", max_length=40, **ENGINE)
  decoder.check_request(2, 5, 12, advice="", **options)
  compiled = decoding.session.compile_program.cache_info().misses
  state = decoder.prefill(PROMPTS[:2, :5])
  decoder.generate(state, 12, jax.random.key(1), **options)
  assert decoding.session.compile_program.cache_info().misses == compiled
