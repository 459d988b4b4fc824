"""The shipped byte-level model: its recorded perplexity, exact generation with it, the example
notebook, and checkpoint file modes."""

import json
import math
import os
import pathlib
import stat

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import text
from lcsm_jax.io import hyenadna
from lcsm_jax.io import native
from lcsm_jax.io import pretrained
from lcsm_jax.models.hyena.model import HyenaLM

NOTEBOOK = pathlib.Path(__file__).parent.parent / "examples" / "generate.ipynb"
# The notebook's generation, repeated here with the same shapes (one compilation per worker).
PROMPT = "def read_config(path):\n"
NUM_TOKENS = 48


@pytest.fixture(scope="module")
def byte_lm():
  return pretrained.load_byte_lm()


def test_shipped_model_matches_its_recorded_perplexity(byte_lm):
  config, params, metrics = byte_lm
  model_config = metrics["model_config"]
  assert (config.vocab_size, config.d_model, config.n_layer, config.l_max) == (
      model_config["vocab_size"], model_config["d_model"], model_config["n_layer"],
      model_config["layer"]["l_max"])
  assert sum(np.size(x) for x in jax.tree.leaves(params)) == metrics["num_params"]
  assert metrics["command"].startswith("python experiments/train_lm.py")

  windows = pretrained.load_byte_lm_heldout_sample()
  seq_len = metrics["train_config"]["seq_len"]
  assert windows.shape == (metrics["heldout_sample_windows"], seq_len + 1)
  assert windows.min() >= 0 and windows.max() < text.VOCAB_SIZE
  logits = jax.jit(HyenaLM(config).apply)(params, windows[:, :-1])
  # Cross-entropy over the real vocabulary, in float64 NumPy (independent of training/trainer.py).
  real = np.asarray(logits, np.float64)[..., :config.vocab_size]
  assert real.shape == (len(windows), seq_len, text.VOCAB_SIZE)
  top = real.max(axis=-1, keepdims=True)
  log_z = np.log(np.exp(real - top).sum(axis=-1)) + top[..., 0]
  target = np.take_along_axis(real, windows[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
  loss = float(np.mean(log_z - target))
  # Recorded with float32 sums on another machine: agreement to ~1e-6 is expected.
  assert loss == pytest.approx(metrics["heldout_sample_loss"], abs=1e-4)
  assert math.exp(loss) == pytest.approx(metrics["heldout_sample_ppl"], rel=1e-4)
  assert math.exp(metrics["heldout_sample_loss"]) == pytest.approx(
      metrics["heldout_sample_ppl"], rel=1e-9)
  # The model learned something: far below the unigram baseline on the same windows.
  assert math.exp(loss) < metrics["heldout_sample_unigram_ppl"] / 5
  assert metrics["heldout_ppl"] < metrics["unigram_ppl"] / 5


def test_flash_and_lazy_generate_identical_valid_text(byte_lm):
  config, params, _ = byte_lm
  prompt = text.encode(PROMPT)[None]
  key = jax.random.key(0)
  outs = {strategy: lcsm_jax.generate(params, config, prompt, NUM_TOKENS, key,
                                      strategy=strategy, temperature=0.8, top_k=40)
          for strategy in ("flash", "lazy")}
  flash, lazy = (np.asarray(outs[s].tokens) for s in ("flash", "lazy"))
  assert flash.shape == (1, NUM_TOKENS) and flash.dtype == np.int32
  np.testing.assert_array_equal(flash, lazy)
  assert flash.min() >= 0 and flash.max() < 256
  decoded = text.decode(flash[0])
  assert isinstance(decoded, str) and decoded
  assert decoded == text.decode(lazy[0])
  # Another key gives another text (the key is really used).
  other = lcsm_jax.generate(params, config, prompt, NUM_TOKENS, jax.random.key(1),
                            strategy="flash", temperature=0.8, top_k=40)
  assert not np.array_equal(np.asarray(other.tokens), flash)


def _notebook_code_cells() -> list[str]:
  notebook = json.loads(NOTEBOOK.read_text("utf-8"))
  assert notebook["nbformat"] == 4
  cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
  return ["".join(cell["source"]) for cell in cells]


def test_example_notebook_executes(capsys):
  sources = _notebook_code_cells()
  assert len(sources) >= 3
  namespace = {"__name__": "__main__"}
  for index, source in enumerate(sources):
    exec(compile(source, f"{NOTEBOOK.name}[cell {index}]", "exec"), namespace)
  printed = capsys.readouterr().out
  assert "flash and lazy generated identical text: True" in printed
  assert namespace["flash_text"] == namespace["lazy_text"]
  assert len(namespace["flash"].tokens[0]) == namespace["NUM_TOKENS"] == NUM_TOKENS
  assert PROMPT + namespace["flash_text"] in printed


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_params_files_follow_the_umask(tmp_path, fixture_dir, umask):
  config, params = hyenadna.load_hyenadna(fixture_dir)
  previous = os.umask(umask)
  try:
    native.save_params(tmp_path / "ckpt", config, params)
  finally:
    os.umask(previous)
  for name in (native.OWN_WEIGHTS, "config.json"):
    mode = stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode)
    assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"
  native.load_params(tmp_path / "ckpt")
