"""Byte tokenizer, stdlib corpus, training loop pieces, and the shipped byte-level model."""

import math
import platform

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import text
from lcsm_jax.io import pretrained
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.training import corpus
from lcsm_jax.training import trainer


# -- Tokenizer. ----------------------------------------------------------------------------------

@pytest.mark.parametrize("s", ["", "def f(x):\n    return x + 1\n", "naïve café ß", "日本語のテキスト",
                               "emoji 🐍🚀 and \u0301combining", "\x00\x7f\t\r\n", "\U0010ffff"])
def test_tokenizer_round_trips_examples(s):
  ids = text.encode(s)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.size == len(s.encode("utf-8"))
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < text.VOCAB_SIZE)
  assert text.decode(ids) == s
  assert text.decode(ids.tolist()) == s


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text())
def test_tokenizer_round_trips_any_text(s):
  assert text.decode(text.encode(s)) == s


def test_decode_replaces_invalid_utf8_and_rejects_out_of_range():
  assert text.VOCAB_SIZE == 256
  cut = text.encode("é")[:1]  # the first byte of a two-byte character
  assert text.decode(np.concatenate([text.encode("a"), cut])) == "a\ufffd"
  with pytest.raises(ValueError):
    text.decode([256])
  with pytest.raises(ValueError):
    text.decode([-1])


# -- Corpus. -------------------------------------------------------------------------------------

def _toy_tree(root):
  files = {
      "a.py": "print('a')\n",
      "pkg/__init__.py": "",
      "pkg/mod.py": "x = 1\n",
      "pkg/test/test_mod.py": "assert True\n",
      "tests/t.py": "pass\n",
      "idlelib/idle_test/x.py": "pass\n",
      "site-packages/third/party.py": "pass\n",
      "__pycache__/a.cpython-311.py": "pass\n",
      "notes.txt": "not python\n",
      "z/deep/er.py": "y = 'é'\n",
  }
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")


def test_corpus_lists_sorted_python_files_outside_tests(tmp_path):
  _toy_tree(tmp_path)
  assert corpus.list_source_files(tmp_path) == [
      "a.py", "pkg/__init__.py", "pkg/mod.py", "z/deep/er.py"]


def test_corpus_split_is_deterministic_disjoint_and_complete(tmp_path):
  files = corpus.list_source_files()  # the running interpreter's stdlib
  assert files == sorted(files) and len(files) > 200
  assert not any(part in corpus.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
  train, heldout = corpus.split_files(files)
  assert (train, heldout) == corpus.split_files(list(files))
  assert set(train).isdisjoint(heldout)
  assert sorted(train + heldout) == files
  assert 0.02 < len(heldout) / len(files) < 0.10
  # The decision depends on the path alone, not on which other files exist.
  assert [corpus.is_heldout(f) for f in heldout[:5]] == [True] * min(5, len(heldout))
  assert corpus.split_files(files[::-1])[1] == heldout[::-1]
  assert corpus.split_files(files, 0.0)[1] == [] and corpus.split_files(files, 1.0)[0] == []


def test_build_corpus_bytes_and_cache(tmp_path):
  src = tmp_path / "src"
  _toy_tree(src)
  c = corpus.build_corpus(src, heldout_fraction=0.5)
  assert c.train.dtype == np.uint8 and c.validation.dtype == np.uint8
  assert set(c.train_files).isdisjoint(c.validation_files)
  expect = lambda fs: b"".join((src / f).read_bytes() for f in fs)
  assert c.train.tobytes() == expect(c.train_files)
  assert c.validation.tobytes() == expect(c.validation_files)
  assert c.python_version == platform.python_version()
  cache = tmp_path / "cache"
  first = corpus.build_corpus(src, heldout_fraction=0.5, cache_dir=cache)
  assert len(list(cache.iterdir())) == 1
  second = corpus.build_corpus(src, heldout_fraction=0.5, cache_dir=cache)
  np.testing.assert_array_equal(first.train, second.train)
  np.testing.assert_array_equal(first.validation, c.validation)


# -- Training pieces. ----------------------------------------------------------------------------

TINY = HyenaConfig(vocab_size=text.VOCAB_SIZE, d_model=16, n_layer=2, d_inner=32, l_max=32,
                   filter_order=8)


def test_unigram_baseline_matches_hand_computation():
  log_probs = trainer.unigram_log_probs(np.array([0, 0, 1, 2], np.uint8), vocab_size=4)
  # Add-one counts [3, 2, 2, 1] over 4 + 4 = 8.
  np.testing.assert_allclose(np.exp(log_probs), [3 / 8, 2 / 8, 2 / 8, 1 / 8])
  windows = np.array([[0, 1, 3], [2, 0, 0]])  # targets 1, 3, 0, 0 (the first column is context)
  want = -(math.log(2 / 8) + math.log(1 / 8) + 2 * math.log(3 / 8)) / 4
  assert trainer.unigram_nll(log_probs, windows) == pytest.approx(want, rel=1e-12)
  assert trainer.perplexity(want) == pytest.approx(
      (8 / 2 * 8 / 1 * 8 / 3 * 8 / 3) ** 0.25, rel=1e-12)


def test_eval_windows_are_deterministic_and_in_range():
  data = np.arange(1000, dtype=np.int64) % 256
  w = trainer.eval_windows(data.astype(np.uint8), seq_len=31, num_windows=8)
  assert w.shape == (8, 32) and w.dtype == np.int32
  np.testing.assert_array_equal(w, trainer.eval_windows(data.astype(np.uint8), 31, 8))
  assert w[0, 0] == 0 and w[-1, -1] == data[-1]
  np.testing.assert_array_equal(np.diff(w, axis=1) % 256, 1)  # contiguous slices


def test_loss_uses_only_the_real_vocabulary():
  config = TINY.replace(vocab_size=250)  # padded to 256
  logits = jnp.zeros((1, 2, config.padded_vocab_size)).at[..., 250:].set(100.0)
  nll = trainer.token_nll(logits, jnp.array([[0, 249]]), config.vocab_size)
  np.testing.assert_allclose(nll, math.log(250), rtol=1e-6)


def test_train_steps_reduce_loss_and_keep_positional_tables_frozen():
  cfg = trainer.TrainConfig(seq_len=24, batch_size=4, steps=20, learning_rate=1e-2,
                             warmup_steps=1, eval_interval=20)
  model, state = trainer.create_train_state(TINY, cfg, jax.random.key(0))
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 25)), jnp.int32)
  z0 = np.asarray(state.params["stack"]["blocks"]["mixer"]["filter"]["z"])
  t0 = np.asarray(state.params["stack"]["blocks"]["mixer"]["filter"]["t"])
  step = trainer.make_train_step(model)
  losses = []
  for _ in range(6):  # each step reports the loss before its update
    state, out = step(state, batch)
    losses.append(float(out["loss"]))
  assert losses[0] == pytest.approx(math.log(256), rel=0.05)
  assert losses[-1] < losses[0] - 0.1
  filt = state.params["stack"]["blocks"]["mixer"]["filter"]
  np.testing.assert_array_equal(filt["z"], z0)
  np.testing.assert_array_equal(filt["t"], t0)
  assert not np.array_equal(filt["freq"], np.full_like(filt["freq"], TINY.activation_freq))


def test_trainable_and_decay_masks():
  params = jax.eval_shape(
      HyenaLM(TINY).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  trainable = trainer.trainable_mask(params)
  assert not trainable["stack"]["blocks"]["mixer"]["filter"]["z"]
  assert not trainable["stack"]["blocks"]["mixer"]["filter"]["t"]
  assert trainer.trainable_mask(params, train_pos_emb=True)["stack"]["blocks"]["mixer"][
      "filter"]["z"]
  assert trainable["embedder"]["embedding"]
  decay = trainer.decay_mask(params)
  assert decay["stack"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert not decay["stack"]["blocks"]["mlp"]["fc1"]["bias"]
  assert not decay["stack"]["blocks"]["mixer"]["filter"]["dense_0"]["kernel"]
  assert not decay["ln_f"]["scale"]
  groups = trainer.param_groups(params)
  assert groups["stack"]["blocks"]["mixer"]["filter"]["dense_0"]["kernel"] == "filter"
  assert groups["stack"]["blocks"]["mixer"]["filter"]["freq"] == "filter"
  assert groups["stack"]["blocks"]["mixer"]["filter"]["t"] == "frozen"
  assert groups["stack"]["blocks"]["mixer"]["in_proj"]["kernel"] == "main"
  assert groups["embedder"]["embedding"] == "main"


# -- The shipped model. --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_lm():
  return pretrained.load_byte_lm()


def test_shipped_model_loads_and_is_small(byte_lm):
  config, params, metrics = byte_lm
  assert config.vocab_size == text.VOCAB_SIZE
  n = trainer.count_params(params["params"])
  assert n == metrics["num_params"]
  assert 4 * n <= 10 * 2**20
  for key in ("heldout_ppl", "unigram_ppl", "step", "wall_time_s", "python_version", "command"):
    assert key in metrics
  assert metrics["step"] == metrics["train_config"]["steps"]
  assert metrics["heldout_ppl"] < metrics["unigram_ppl"] / 3


def test_shipped_model_heldout_sample_perplexity(byte_lm):
  config, params, metrics = byte_lm
  sample = pretrained.load_byte_lm_heldout_sample()
  assert sample.shape == (metrics["heldout_sample_windows"],
                          metrics["train_config"]["seq_len"] + 1)
  model = HyenaLM(config)
  nll = trainer.evaluate(trainer.make_eval_fn(model), params["params"], sample,
                          metrics["train_config"]["eval_batch_size"])
  assert nll == pytest.approx(metrics["heldout_sample_loss"], rel=1e-3)
  ppl = trainer.perplexity(nll)
  assert ppl < metrics["heldout_sample_unigram_ppl"] / 3
  assert ppl < 4.5


def test_shipped_heldout_sample_comes_from_this_corpus(byte_lm):
  _, _, metrics = byte_lm
  if platform.python_version() != metrics["python_version"]:
    pytest.skip(f"the corpus of Python {platform.python_version()} differs from the "
                f"training corpus (Python {metrics['python_version']})")
  c = corpus.build_corpus()
  cfg = metrics["train_config"]
  windows = trainer.eval_windows(c.validation, cfg["seq_len"], cfg["eval_windows"])
  np.testing.assert_array_equal(windows[:metrics["heldout_sample_windows"]],
                                pretrained.load_byte_lm_heldout_sample())
  assert c.validation.size == metrics["heldout_tokens"]
  assert c.train.size == metrics["train_tokens"]
