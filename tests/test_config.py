"""Configurations: presets build (abstractly), config dicts round-trip, both HyenaDNA formats
parse, bad values are refused."""

import json

import jax
import jax.numpy as jnp
import pytest

from lcsm_jax import config as config_lib
from lcsm_jax.config import PRESETS, HyenaConfig, preset
from lcsm_jax.model import HyenaLM, init_params


def _param_count(cfg):
  """Parameters of a HyenaDNA model, counted from its architecture (PyTorch layout)."""
  d, fo, nf = cfg.d_model, cfg.filter_order, cfg.num_convolutions * cfg.d_model
  width = (cfg.order + 1) * d
  per_layer = (
      4 * d                                          # norm1, norm2
      + width * d + width                            # in_proj
      + d * d + d                                    # out_proj
      + width * cfg.short_filter_order + width       # short_filter
      + nf + nf                                      # filter bias, deltas
      + cfg.l_max * (cfg.emb_dim + 1)                # positional tables z, t
      + cfg.emb_dim * fo + fo                        # first filter layer
      + cfg.num_inner_mlps * (fo * fo + fo)          # inner filter layers
      + fo                                           # the shared Sin frequency
      + fo * nf                                      # filter output (no bias)
      + 2 * d * cfg.d_inner + cfg.d_inner + d)       # MLP
  return cfg.padded_vocab_size * d + 2 * d + cfg.n_layer * per_layer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_abstractly(name):
  cfg = preset(name)
  # eval_shape: shapes only, nothing allocated (large-1m has l_max = 1M).
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  blocks = shapes["params"]["stack"]["blocks"]
  assert shapes["params"]["embedder"]["embedding"].shape == (cfg.padded_vocab_size, cfg.d_model)
  assert blocks["mixer"]["filter"]["z"].shape == (cfg.n_layer, cfg.l_max, cfg.emb_dim)
  assert blocks["mixer"]["in_proj"]["kernel"].shape == (cfg.n_layer, cfg.d_model,
                                                        (cfg.order + 1) * cfg.d_model)
  assert blocks["mlp"]["fc1"]["kernel"].shape == (cfg.n_layer, cfg.d_model, cfg.d_inner)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == _param_count(cfg)
  logits = jax.eval_shape(HyenaLM(cfg).apply, shapes, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert logits.shape == (2, 16, cfg.padded_vocab_size) and logits.dtype == jnp.float32


def test_presets_are_the_published_sizes():
  for name, cfg in PRESETS.items():
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.emb_dim, cfg.activation_freq) == (
        12, 16, 5, 10.0), name
    assert cfg.l_max % 2 == 0 and cfg.d_inner == 4 * cfg.d_model, name
  assert (PRESETS["large-1m"].l_max, PRESETS["large-1m"].n_layer) == (1_000_002, 8)
  assert preset("tiny-1k", n_layer=3).n_layer == 3
  with pytest.raises(ValueError, match="unknown preset 'huge'; known presets: tiny-1k"):
    preset("huge")


NON_DEFAULT = HyenaConfig(vocab_size=7, d_model=9, n_layer=3, d_inner=11, l_max=99, order=4,
                          filter_order=13, emb_dim=7, short_filter_order=5, num_inner_mlps=1,
                          activation_freq=3.5, modulate=False, modulation_shift=0.125,
                          fast_decay_pct=0.25, slow_decay_pct=1.75, decay_target=0.02,
                          layer_norm_epsilon=1e-6, pad_vocab_size_multiple=4,
                          residual_in_fp32=False)


@pytest.mark.parametrize("cfg", list(PRESETS.values()) + [NON_DEFAULT],
                         ids=sorted(PRESETS, key=list(PRESETS).index) + ["non-default"])
def test_hyenadna_dict_round_trip(tmp_path, cfg):
  assert HyenaConfig.from_hyenadna_dict(cfg.to_hyenadna_dict()) == cfg
  path = tmp_path / "config.json"
  path.write_text(json.dumps(cfg.to_hyenadna_dict()))
  assert HyenaConfig.from_json_file(path) == cfg


def test_every_field_is_checked_by_the_round_trip():
  # NON_DEFAULT differs from the defaults in every field, so the round trip covers them all.
  default = HyenaConfig()
  same = [f for f in HyenaConfig.__dataclass_fields__
          if getattr(NON_DEFAULT, f) == getattr(default, f)]
  assert not same, same


def test_hugging_face_format():
  # The keys of LongSafari/hyenadna-tiny-1k-seqlen-hf's config.json.
  raw = {
      "_name_or_path": "LongSafari/hyenadna-tiny-1k-seqlen-hf", "activation_freq": 10,
      "architectures": ["HyenaDNAForCausalLM"], "d_inner": 512, "d_model": 128, "emb_dim": 5,
      "embed_dropout": 0.1, "filter_order": 64, "hyena_dropout": 0.0,
      "hyena_filter_dropout": 0.0, "hyena_order": 2, "initializer_range": 0.02,
      "layer_norm_epsilon": 1e-05, "max_seq_len": 1026, "model_type": "hyenadna",
      "n_layer": 2, "num_inner_mlps": 2, "pad_vocab_size_multiple": 8,
      "short_filter_order": 3, "tie_word_embeddings": False, "train_freq": True,
      "use_bias": True, "vocab_size": 12,
  }
  assert HyenaConfig.from_hyenadna_dict(raw) == PRESETS["tiny-1k"]
  order3 = HyenaConfig.from_hyenadna_dict(dict(raw, hyena_order=3, max_seq_len=2050))
  assert (order3.order, order3.l_max, order3.num_streams) == (3, 2050, 4)
  with pytest.raises(ValueError, match="missing the field 'max_seq_len'"):
    HyenaConfig.from_hyenadna_dict({k: v for k, v in raw.items() if k != "max_seq_len"})


def test_original_format_defaults_and_aliases():
  raw = {"d_model": 8, "n_layer": 1, "vocab_size": 5,
         "layer": {"l_max": 10, "local_order": 4, "w": 2}}
  cfg = HyenaConfig.from_hyenadna_dict(raw)
  assert (cfg.d_inner, cfg.short_filter_order, cfg.activation_freq, cfg.emb_dim) == (
      32, 4, 2.0, 3)
  assert cfg.pad_vocab_size_multiple == 1 and cfg.order == 2 and cfg.modulation_shift == 0.05
  assert HyenaConfig.from_hyenadna_dict(dict(raw, d_model=8.0)).d_model == 8


@pytest.mark.parametrize("fields,match", [
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_layer=True), "n_layer must be a positive integer"),
    (dict(order=1), "order must be an integer >= 2"),
    (dict(emb_dim=4), "emb_dim must be odd and >= 3"),
    (dict(num_inner_mlps=-1), "num_inner_mlps must be >= 0"),
])
def test_invalid_config_values(fields, match):
  with pytest.raises(ValueError, match=match):
    HyenaConfig(**fields)


def test_from_hyenadna_dict_rejects_non_mapping():
  with pytest.raises(ValueError, match="must be a JSON object"):
    HyenaConfig.from_hyenadna_dict([("d_model", 4)])
  assert config_lib.HyenaConfig is HyenaConfig
