"""Configurations: presets build (abstractly), config dicts round-trip, both HyenaDNA formats
parse, bad values are refused."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax.models.hyena import config as config_lib
from lcsm_jax.models.hyena.config import PRESETS, HyenaConfig, preset
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.modules import ImplicitFilter
from lcsm_jax.models.hyena.params import init_params


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


@pytest.mark.parametrize("fields,error,match", [
    (dict(d_model=0), ValueError, r"HyenaConfig\.d_model must be a positive integer, got 0\."),
    (dict(n_layer=True), TypeError, r"HyenaConfig\.n_layer must be a positive integer, got True"),
    (dict(order=1), ValueError, r"HyenaConfig\.order must be an integer >= 2, got 1\."),
    (dict(emb_dim=4), ValueError, r"HyenaConfig\.emb_dim must be odd and >= 3 .*, got 4\."),
    (dict(num_inner_mlps=-1), ValueError, r"HyenaConfig\.num_inner_mlps must be >= 0, got -1\."),
])
def test_invalid_config_values(fields, error, match):
  with pytest.raises(error, match=match):
    HyenaConfig(**fields)


INT_FIELDS = ("vocab_size", "d_model", "n_layer", "d_inner", "l_max", "filter_order",
              "short_filter_order", "pad_vocab_size_multiple")
FLOAT_FIELDS = ("activation_freq", "modulation_shift", "fast_decay_pct", "slow_decay_pct",
                "decay_target", "layer_norm_epsilon")
FINITE = r"must be finite \(\|value\| <= 3\.39e\+38, the largest bfloat16\)"
RANGE = {
    "layer_norm_epsilon": r"must be > 0 \(and >= 1\.4e-45, else it is 0 in float32\)",
    "decay_target": r"must lie in \(0, 1\) \(the initial decay rates are log\(decay_target\)",
    "fast_decay_pct": r"must be > 0 \(it divides log\(decay_target\)\)",
    "slow_decay_pct": r"must be > 0 \(it divides log\(decay_target\)\)",
}
# (field, bad value, error, what the message says after 'HyenaConfig.<field> ').
BAD_VALUES = (
    [(f, v, ValueError, "must be a positive integer") for f in INT_FIELDS for v in (0, -3)]
    + [(f, v, TypeError, "must be a positive integer")
       for f in INT_FIELDS for v in (True, 2.0, "4", None)]
    + [("order", 1, ValueError, "must be an integer >= 2"),
       ("order", 0, ValueError, "must be an integer >= 2"),
       ("order", True, TypeError, "must be an integer >= 2"),
       ("order", 2.0, TypeError, "must be an integer >= 2"),
       ("emb_dim", 4, ValueError, "must be odd and >= 3"),
       ("emb_dim", 1, ValueError, "must be odd and >= 3"),
       ("emb_dim", True, TypeError, "must be odd and >= 3"),
       ("emb_dim", 5.0, TypeError, "must be odd and >= 3"),
       ("num_inner_mlps", -1, ValueError, "must be >= 0"),
       ("num_inner_mlps", False, TypeError, "must be >= 0"),
       ("num_inner_mlps", 2.0, TypeError, "must be >= 0"),
       ("modulate", 1, TypeError, "must be True or False"),
       ("residual_in_fp32", "yes", TypeError, "must be True or False")]
    + [(f, v, ValueError, FINITE)
       for f in FLOAT_FIELDS for v in (math.nan, math.inf, -math.inf, 1e39, -1e39, 10**400)]
    + [(f, v, TypeError, "must be a real number") for f in FLOAT_FIELDS for v in (True, "1", None)]
    + [("layer_norm_epsilon", v, ValueError, RANGE["layer_norm_epsilon"])
       for v in (0.0, -1.0, -1e-5, 1e-46)]
    + [("decay_target", v, ValueError, RANGE["decay_target"]) for v in (0.0, -1.0, 1.0, 1.5)]
    + [(f, v, ValueError, RANGE[f])
       for f in ("fast_decay_pct", "slow_decay_pct") for v in (0.0, -0.3)]
    + [(f, 1e-320, ValueError, rf"is too small: the initial decay rate log\(decay_target\) / "
        rf"{f} = -inf overflows float32/bfloat16")
       for f in ("fast_decay_pct", "slow_decay_pct")]
)


@pytest.mark.parametrize("field,value,error,match", BAD_VALUES,
                         ids=[f"{f}={v!r}"[:40] for f, v, _, _ in BAD_VALUES])
def test_every_field_is_validated(field, value, error, match):
  shown = re.escape(repr(value))
  with pytest.raises(error, match=rf"^HyenaConfig\.{field} {match}.*, got {shown}\.$"):
    HyenaConfig(**{field: value})
  with pytest.raises(error, match=rf"HyenaConfig\.{field} "):
    PRESETS["tiny-1k"].replace(**{field: value})  # replace() checks as the constructor does


def test_every_field_has_a_bad_value():
  assert {f for f, *_ in BAD_VALUES} == set(HyenaConfig.__dataclass_fields__)


@pytest.mark.parametrize("fields", [
    dict(modulation_shift=-0.5, activation_freq=-3.0),  # any finite shift and frequency
    dict(modulation_shift=0.0, activation_freq=0.0),
    dict(fast_decay_pct=2.0, slow_decay_pct=0.5),       # fast > slow: the rates just swap ends
    dict(fast_decay_pct=3e-36, decay_target=1e-300),    # a rate of -2.3e38, near the limit
    dict(decay_target=1 - 1e-12, slow_decay_pct=1e30),  # rates near 0: (almost) no decay
    dict(layer_norm_epsilon=2.0**-149, activation_freq=10),  # smallest float32; an int freq
    dict(activation_freq=np.float32(2.5), modulation_shift=np.float64(0.1)),
], ids=["negative-shift", "zero-shift", "fast>slow", "huge-rates", "tiny-rates", "tiny-eps",
        "numpy-floats"])
def test_accepted_edge_values_give_finite_filters(fields):
  """What the checks accept must give finite filters: the implicit filter at its init."""
  cfg = HyenaConfig(d_model=4, l_max=32, filter_order=8, emb_dim=3, **fields)
  module = ImplicitFilter(features=cfg.d_model, l_max=cfg.l_max, emb_dim=cfg.emb_dim,
                          width=cfg.filter_order, num_inner_mlps=cfg.num_inner_mlps,
                          activation_freq=cfg.activation_freq, modulate=True,
                          modulation_shift=cfg.modulation_shift,
                          fast_decay_pct=cfg.fast_decay_pct, slow_decay_pct=cfg.slow_decay_pct,
                          decay_target=cfg.decay_target)
  variables = module.init(jax.random.key(0), cfg.l_max)
  taps = module.apply(variables, cfg.l_max)
  assert taps.shape == (cfg.l_max, cfg.d_model)
  assert np.isfinite(np.asarray(taps)).all(), fields
  assert np.isfinite(np.asarray(variables["params"]["deltas"])).all(), fields


# (HyenaDNA field as named in messages, how to set it in the original format's dict, our field).
ORIGINAL_FIELDS = [
    ("layer.target", lambda c, v: c["layer"].update(target=v), "decay_target"),
    ("layer.shift", lambda c, v: c["layer"].update(shift=v), "modulation_shift"),
    ("layer.w", lambda c, v: c["layer"].update(w=v), "activation_freq"),
    ("layer.fast_decay_pct", lambda c, v: c["layer"].update(fast_decay_pct=v), "fast_decay_pct"),
    ("layer.slow_decay_pct", lambda c, v: c["layer"].update(slow_decay_pct=v), "slow_decay_pct"),
    ("layer_norm_epsilon", lambda c, v: c.update(layer_norm_epsilon=v), "layer_norm_epsilon"),
]
ORIGINAL_BAD = (
    [(name, set_, field, v) for name, set_, field in ORIGINAL_FIELDS
     for v in (math.nan, math.inf, -math.inf)]
    + [("layer.target", ORIGINAL_FIELDS[0][1], "decay_target", v) for v in (0, -1, 1)]
    + [("layer.fast_decay_pct", ORIGINAL_FIELDS[3][1], "fast_decay_pct", 0),
       ("layer.slow_decay_pct", ORIGINAL_FIELDS[4][1], "slow_decay_pct", -1.5),
       ("layer_norm_epsilon", ORIGINAL_FIELDS[5][1], "layer_norm_epsilon", -1),
       ("layer_norm_epsilon", ORIGINAL_FIELDS[5][1], "layer_norm_epsilon", 0)]
)


@pytest.mark.parametrize("name,set_value,field,value", ORIGINAL_BAD,
                         ids=[f"{n}={v!r}" for n, _, _, v in ORIGINAL_BAD])
def test_hyenadna_reader_names_the_hyenadna_field(tmp_path, name, set_value, field, value):
  raw = NON_DEFAULT.to_hyenadna_dict()
  set_value(raw, value)
  shown = re.escape(repr(float(value)))  # the reader reads every float field as a float
  match = rf"HyenaDNA config field '{re.escape(name)}': HyenaConfig\.{field} .*, got {shown}\.$"
  with pytest.raises(ValueError, match=match):
    HyenaConfig.from_hyenadna_dict(raw)
  # ...and from a config.json (Python's json reads and writes NaN and Infinity literals).
  path = tmp_path / "config.json"
  path.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
    HyenaConfig.from_json_file(path)


@pytest.mark.parametrize("change,match", [
    (dict(hyena_order=1), r"field 'hyena_order': HyenaConfig\.order must be an integer >= 2"),
    (dict(max_seq_len=0), r"field 'max_seq_len': HyenaConfig\.l_max must be a positive integer"),
    (dict(activation_freq=math.nan), r"field 'activation_freq': HyenaConfig\.activation_freq "
                                     r"must be finite"),
    (dict(layer_norm_epsilon=-1e-5), r"field 'layer_norm_epsilon': HyenaConfig\."
                                     r"layer_norm_epsilon must be > 0"),
    (dict(emb_dim=4), r"field 'emb_dim': HyenaConfig\.emb_dim must be odd"),
    (dict(d_model=0), r"field 'd_model': HyenaConfig\.d_model must be a positive integer, got 0"),
])
def test_hugging_face_reader_names_its_fields(change, match):
  raw = {"d_model": 128, "n_layer": 2, "vocab_size": 12, "d_inner": 512, "max_seq_len": 1026,
         "hyena_order": 2, "emb_dim": 5, "activation_freq": 10, "layer_norm_epsilon": 1e-5}
  assert HyenaConfig.from_hyenadna_dict(raw).l_max == 1026
  with pytest.raises(ValueError, match=match):
    HyenaConfig.from_hyenadna_dict(dict(raw, **change))


def test_integer_beyond_float_range_in_config_json(tmp_path):
  raw = NON_DEFAULT.to_hyenadna_dict()
  path = tmp_path / "config.json"
  path.write_text(json.dumps(raw).replace('"w": 3.5', '"w": 1' + "0" * 400))
  with pytest.raises(ValueError, match=r"field 'layer\.w': HyenaConfig\.activation_freq must be "
                                       r"finite .*, got inf\.$"):
    HyenaConfig.from_json_file(path)


def test_original_reader_names_aliases_and_derived_fields():
  raw = {"d_model": 8, "n_layer": 1, "vocab_size": 5,
         "layer": {"l_max": 10, "local_order": 0}}
  with pytest.raises(ValueError, match=r"field 'layer\.local_order': HyenaConfig\."
                                       r"short_filter_order must be a positive integer, got 0"):
    HyenaConfig.from_hyenadna_dict(raw)
  raw["layer"]["local_order"] = 3
  with pytest.raises(ValueError, match=r"field 'layer\.l_max': HyenaConfig\.l_max must be a "
                                       r"positive integer, got -1"):
    HyenaConfig.from_hyenadna_dict(dict(raw, layer=dict(raw["layer"], l_max=-1)))
  with pytest.raises(ValueError, match=r"field 'pad_vocab_size_multiple': "):
    HyenaConfig.from_hyenadna_dict(dict(raw, pad_vocab_size_multiple=0))


def test_from_hyenadna_dict_rejects_non_mapping():
  with pytest.raises(ValueError, match="must be a JSON object"):
    HyenaConfig.from_hyenadna_dict([("d_model", 4)])
  assert config_lib.HyenaConfig is HyenaConfig
