"""Checkpoint loading (HyenaDNA) and the project's own save/load: corrupted copies of the
fixture are refused with a message that names the problem; good ones load exactly."""

import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lcsm_jax.errors import CheckpointError
from lcsm_jax.io import native
from lcsm_jax.io.hyenadna import load_hyenadna, params_from_state_dict
from lcsm_jax.io.native import load_params, read_metadata, save_params
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.params import cast_params, check_params, init_params
from state_dict_helpers import state_dict_from_params

LAYER0 = "backbone.layers.0."


@pytest.fixture(scope="module")
def fixture_state(fixture_dir):
  return load_file(str(fixture_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def fixture_config(fixture_dir):
  return json.loads((fixture_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def fixture_params(fixture_dir):
  return load_hyenadna(fixture_dir)


def _write(path, config, state, weights="model.safetensors"):
  """A checkpoint directory: `config` (dict, or raw text) and `state` in the format of `weights`."""
  path.mkdir(parents=True, exist_ok=True)
  if config is not None:
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
  if weights.endswith(".safetensors"):
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path / weights))
  elif weights.endswith(".npz"):
    np.savez(path / weights, **state)
  return path


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- good checkpoints -------------------------------------------------------------------------


def test_fixture_loads_as_the_state_dict_says(fixture_params, fixture_state):
  config, params = fixture_params
  assert (config.d_model, config.n_layer, config.d_inner, config.vocab_size) == (64, 2, 256, 12)
  assert config.activation_freq == 10.0 and config.l_max == 1026
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  # The independent inverse mapping gives the stored tensors back, bit for bit.
  back = state_dict_from_params(config, params, dtype=np.float32)
  assert set(back) == set(fixture_state)
  for key, value in fixture_state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_npz_and_weight_file_paths_load_the_same_params(tmp_path, fixture_dir, fixture_params,
                                                        fixture_config, fixture_state):
  _, params = fixture_params
  npz_dir = _write(tmp_path / "npz", fixture_config, fixture_state, weights="weights.npz")
  _assert_same_tree(load_hyenadna(npz_dir)[1], params)
  _assert_same_tree(load_hyenadna(npz_dir / "weights.npz")[1], params)
  _assert_same_tree(load_hyenadna(fixture_dir / "model.safetensors")[1], params)


@pytest.mark.parametrize("prefix", ["hyena.", "model.", "module."])
def test_wrapped_keys_and_tied_head(tmp_path, prefix, fixture_params, fixture_config,
                                    fixture_state):
  _, params = fixture_params
  state = {prefix + k: v for k, v in fixture_state.items()}
  # The Hugging Face port keeps a (tied) lm_head next to the 'hyena.' backbone.
  state["lm_head.weight"] = fixture_state["backbone.embeddings.word_embeddings.weight"]
  _assert_same_tree(load_hyenadna(_write(tmp_path, fixture_config, state))[1], params)


def test_untied_head_is_refused(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  state["lm_head.weight"] = state["backbone.embeddings.word_embeddings.weight"] + 1.0
  with pytest.raises(CheckpointError, match="lm_head.weight .* differs from backbone.embeddings"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


def test_dtype_option(tmp_path, fixture_config, fixture_state):
  state16 = {k: v.astype(jnp.bfloat16) for k, v in fixture_state.items()}
  path = _write(tmp_path, fixture_config, state16)
  _, stored = load_hyenadna(path, dtype=None)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(stored))
  _, params = load_hyenadna(path)  # float32 by default
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(params["params"]["ln_f"]["bias"],
                                state16["backbone.ln_f.bias"].astype(np.float32))


# -- corrupted checkpoints ---------------------------------------------------------------------


def test_missing_tensor(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  del state["backbone.layers.1.mlp.fc2.bias"]
  with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.layers\.1\.mlp\.fc2\.bias"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


def test_unexpected_tensor(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state, **{LAYER0 + "mixer.extra.weight": np.zeros((3,), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensors: backbone\.layers\.0\.mixer\.extra"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


def test_wrong_shape(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  state[LAYER0 + "mixer.in_proj.weight"] = np.zeros((192, 63), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"mixer\.in_proj\.weight has shape \(192, 63\), the config expects "
                           r"\(192, 64\)"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


def test_every_problem_is_named_at_once(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  del state[LAYER0 + "norm1.bias"]
  state["backbone.extra"] = np.zeros((1,), np.float32)
  state[LAYER0 + "mlp.fc1.bias"] = np.zeros((5,), np.float32)
  state[LAYER0 + "norm2.bias"] = np.zeros((64,), np.int32)
  with pytest.raises(CheckpointError) as info:
    load_hyenadna(_write(tmp_path, fixture_config, state))
  message = str(info.value)
  for fragment in ("missing tensors: backbone.layers.0.norm1.bias",
                   "unexpected tensors: backbone.extra", "mlp.fc1.bias has shape (5,)",
                   "norm2.bias has dtype int32"):
    assert fragment in message, message


def test_non_finite_values(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  bad = state["backbone.ln_f.weight"].copy()
  bad[3] = np.nan
  state["backbone.ln_f.weight"] = bad
  with pytest.raises(CheckpointError, match=r"backbone\.ln_f\.weight holds non-finite values"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


@pytest.mark.parametrize("change,match", [
    ({"n_layer": 3}, r"missing tensors: backbone\.layers\.2\."),
    ({"n_layer": 1}, r"unexpected tensors: backbone\.layers\.1\."),
    ({"d_model": 32}, r"backbone\.embeddings\.word_embeddings\.weight has shape \(16, 64\), "
                      r"the config expects \(16, 32\)"),
    ({"d_inner": 128}, r"mlp\.fc1\.weight has shape \(256, 64\), the config expects \(128, 64\)"),
    ({"vocab_size": 20}, r"word_embeddings\.weight has shape \(16, 64\), the config expects "
                         r"\(24, 64\)"),
])
def test_wrong_config(tmp_path, fixture_config, fixture_state, change, match):
  with pytest.raises(CheckpointError, match=match):
    load_hyenadna(_write(tmp_path, dict(fixture_config, **change), fixture_state))


def test_wrong_layer_config(tmp_path, fixture_config, fixture_state):
  config = dict(fixture_config, layer=dict(fixture_config["layer"], l_max=2048))
  with pytest.raises(CheckpointError, match=r"pos_emb\.z has shape \(1, 1026, 5\), the config "
                                            r"expects \(1, 2048, 5\)"):
    load_hyenadna(_write(tmp_path, config, fixture_state))


def test_differing_sin_frequencies(tmp_path, fixture_config, fixture_state):
  state = dict(fixture_state)
  key = "backbone.layers.1.mixer.filter_fn.implicit_filter.3.freq"
  state[key] = state[key] * 1.01
  with pytest.raises(CheckpointError,
                     match=r"implicit_filter\.3\.freq differs from .*implicit_filter\.1\.freq: "
                           r"the filter MLP's Sin frequencies differ"):
    load_hyenadna(_write(tmp_path, fixture_config, state))


@pytest.mark.parametrize("text,match", [
    ('{"d_model": 64, "n_layer": ', "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object, got list"),
    ('"hyena"', "must be a JSON object, got str"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_malformed_config_json(tmp_path, fixture_state, text, match):
  path = _write(tmp_path, None, fixture_state)
  if isinstance(text, bytes):
    (path / "config.json").write_bytes(text)
  else:
    (path / "config.json").write_text(text)
  with pytest.raises(CheckpointError, match=match):
    load_hyenadna(path)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.pop("d_model"), "missing the field 'd_model'"),
    (lambda c: c.update(n_layer="two"), "field 'n_layer' must be an integer, got 'two'"),
    (lambda c: c.update(n_layer=2.5), "field 'n_layer' must be an integer, got 2.5"),
    (lambda c: c.update(residual_in_fp32="yes"), "'residual_in_fp32' must be true or false"),
    (lambda c: c.update(layer=[1]), "field 'layer' must be an object"),
    (lambda c: c["layer"].pop("l_max"), "missing the field 'layer.l_max'"),
    (lambda c: c["layer"].update(w=None, emb_dim="5"), "'layer.emb_dim' must be an integer"),
    (lambda c: c["layer"].update(_name_="mha"), "only Hyena mixers are supported"),
    (lambda c: c.update(attn_layer_idx=[1]), "attention layers"),
    (lambda c: c.update(d_model=0), "d_model must be a positive integer, got 0"),
    (lambda c: c["layer"].update(emb_dim=4), "emb_dim must be odd"),
])
def test_invalid_config_fields(tmp_path, fixture_config, fixture_state, change, match):
  config = json.loads(json.dumps(fixture_config))
  change(config)
  with pytest.raises(CheckpointError, match=match):
    load_hyenadna(_write(tmp_path, config, fixture_state))


def test_missing_config(tmp_path, fixture_state):
  path = _write(tmp_path, None, fixture_state)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hyenadna(path)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hyenadna(path / "model.safetensors")


def test_missing_path_and_weights(tmp_path, fixture_config):
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    load_hyenadna(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text(json.dumps(fixture_config))
  with pytest.raises(CheckpointError, match="holds none of the weight files"):
    load_hyenadna(tmp_path)
  (tmp_path / "weights.txt").write_text("1 2 3")
  with pytest.raises(CheckpointError, match="unknown weight format '.txt'"):
    load_hyenadna(tmp_path / "weights.txt")


@pytest.mark.parametrize("name,match", [
    ("model.safetensors", "not a readable safetensors file"),
    ("weights.npz", "not a readable .npz file"),
])
def test_garbage_weights(tmp_path, fixture_config, name, match):
  (tmp_path / "config.json").write_text(json.dumps(fixture_config))
  (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(CheckpointError, match=match):
    load_hyenadna(tmp_path)


def test_truncated_safetensors(tmp_path, fixture_dir, fixture_config):
  data = (fixture_dir / "model.safetensors").read_bytes()
  (tmp_path / "config.json").write_text(json.dumps(fixture_config))
  (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    load_hyenadna(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="checks the message given when torch is absent")
def test_pytorch_bin_without_torch(tmp_path, fixture_config):
  (tmp_path / "config.json").write_text(json.dumps(fixture_config))
  (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a torch file")
  with pytest.raises(CheckpointError, match="torch is not installed") as info:
    load_hyenadna(tmp_path)
  assert "safetensors.torch.save_file" in str(info.value)  # says how to convert
  assert "pytorch_model.bin" in str(info.value)


def test_state_dict_must_be_a_mapping(fixture_params):
  config, _ = fixture_params
  with pytest.raises(CheckpointError, match="must be a mapping"):
    params_from_state_dict(config, [("backbone.ln_f.weight", np.zeros(64))])


# -- the project's own format -------------------------------------------------------------------

SMALL = HyenaConfig(vocab_size=9, d_model=6, n_layer=2, d_inner=10, l_max=17, order=3,
                    filter_order=8, emb_dim=3, modulation_shift=0.1)


@pytest.fixture(scope="module")
def small_params():
  """Random parameters of SMALL's shapes (drawn by NumPy: no initialiser to compile)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_params(SMALL, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def test_save_load_round_trip_float32(tmp_path, small_params):
  save_params(tmp_path, SMALL, small_params, metadata={"step": "12", "note": "hello"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "params.safetensors"]
  config, params = load_params(tmp_path)
  assert config == SMALL
  _assert_same_tree(params, jax.tree.map(np.asarray, small_params))
  assert read_metadata(tmp_path) == {"step": "12", "note": "hello"}


def test_save_load_round_trip_bfloat16_native(tmp_path, small_params):
  params16 = cast_params(SMALL, small_params, jnp.bfloat16)
  save_params(tmp_path, SMALL, params16)
  with safe_open(str(tmp_path / "params.safetensors"), framework="np") as f:
    stored = f.get_tensor("params/ln_f/scale").dtype
  assert stored == jnp.bfloat16  # this safetensors stores bfloat16 from NumPy natively
  _, params = load_params(tmp_path)
  _assert_same_tree(params, jax.tree.map(np.asarray, params16))


def test_save_load_round_trip_bfloat16_fallback(tmp_path, monkeypatch, small_params):
  # Where safetensors cannot store bfloat16 from NumPy, the arrays go out as float32 with a
  # metadata note, and come back as bfloat16.
  monkeypatch.setattr(native, "_safetensors_stores_bfloat16", lambda: False)
  params16 = cast_params(SMALL, small_params, jnp.bfloat16)
  save_params(tmp_path, SMALL, params16, metadata={"step": "3"})
  with safe_open(str(tmp_path / "params.safetensors"), framework="np") as f:
    assert f.get_tensor("params/ln_f/scale").dtype == np.float32
    assert "params/ln_f/scale" in f.metadata()[native.BFLOAT16_AS_FLOAT32]
  _, params = load_params(tmp_path)
  _assert_same_tree(params, jax.tree.map(np.asarray, params16))
  assert read_metadata(tmp_path) == {"step": "3"}


def test_save_refuses_params_that_do_not_match(tmp_path, small_params):
  params = jax.tree.map(np.asarray, small_params)
  params["params"]["ln_f"]["scale"] = np.ones((7,), np.float32)
  with pytest.raises(CheckpointError, match=r"params/ln_f/scale has shape \(7,\), the config "
                                            r"expects \(6,\)"):
    save_params(tmp_path / "out", SMALL, params)
  assert not (tmp_path / "out" / "params.safetensors").exists()
  with pytest.raises(TypeError, match="metadata must map str to str"):
    save_params(tmp_path / "out", SMALL, small_params, metadata={"step": 3})


def test_load_params_errors(tmp_path, small_params):
  with pytest.raises(CheckpointError, match="has no params.safetensors"):
    load_params(tmp_path)
  save_params(tmp_path, SMALL, small_params)
  flat = load_file(str(tmp_path / "params.safetensors"))
  del flat["params/stack/blocks/mlp/fc1/bias"]
  flat["params/stack/blocks/mlp/fc2/bias"] = np.zeros((2, 5), np.float32)
  save_file(flat, str(tmp_path / "params.safetensors"))
  with pytest.raises(CheckpointError) as info:
    load_params(tmp_path)
  assert "missing parameters: params/stack/blocks/mlp/fc1/bias" in str(info.value)
  assert "params/stack/blocks/mlp/fc2/bias has shape (2, 5)" in str(info.value)
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_params(tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_params(tmp_path)


def test_check_params_messages(small_params):
  with pytest.raises(CheckpointError, match=r"wrapped as \{'params': \.\.\.\}"):
    check_params(SMALL, small_params["params"])
  with pytest.raises(CheckpointError, match="must be a nested dict"):
    check_params(SMALL, [1, 2])
  params = jax.tree.map(np.asarray, small_params)
  params["params"]["embedder"]["embedding"] = params["params"]["embedder"]["embedding"].astype(
      np.int32)
  with pytest.raises(CheckpointError, match="embedding has dtype int32"):
    check_params(SMALL, params)
  other = SMALL.replace(d_model=8)
  with pytest.raises(CheckpointError, match=r"params/ln_f/scale has shape \(6,\), the config "
                                            r"expects \(8,\)"):
    check_params(other, small_params)


def test_fixture_copy_round_trips_through_own_format(tmp_path, fixture_params):
  config, params = fixture_params
  save_params(tmp_path, config, params)
  config2, params2 = load_params(tmp_path)
  assert config2 == config
  _assert_same_tree(params2, params)
  # ...and the whole directory can be moved: nothing refers to its old place.
  shutil.move(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "-moved")))
  _assert_same_tree(load_params(tmp_path.parent / (tmp_path.name + "-moved"))[1], params)
