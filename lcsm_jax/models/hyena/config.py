"""Typed configuration of a Hyena language model, and the published HyenaDNA sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping

# The largest finite bfloat16 (just below float32's largest): float fields are turned into
# parameters of either dtype, so larger values would become inf there.
_BFLOAT16_MAX = (2 - 2**-7) * 2.0**127
# The smallest positive float32 (subnormal); positive floats below it round to 0 in float32.
_FLOAT32_TINY = 2.0**-149
_FLOAT_FIELDS = ("activation_freq", "modulation_shift", "fast_decay_pct", "slow_decay_pct",
                 "decay_target", "layer_norm_epsilon")


def _invalid(kind: type[Exception], name: str, requirement: str, value: Any) -> Exception:
  """`kind('HyenaConfig.<name> <requirement>, got <value>.')`, remembering the field's name
  (`from_hyenadna_dict` names the HyenaDNA field instead)."""
  error = kind(f"HyenaConfig.{name} {requirement}, got {value!r}.")
  error.field = name
  return error


def _check_int(name: str, value: Any, minimum: int, requirement: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise _invalid(TypeError, name, f"must be {requirement}", value)
  if value < minimum:
    raise _invalid(ValueError, name, f"must be {requirement}", value)


def _check_float(name: str, value: Any) -> None:
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise _invalid(TypeError, name, "must be a real number", value)
  try:
    number = float(value)
  except OverflowError:  # an int beyond float's range
    number = math.inf
  if not math.isfinite(number) or abs(number) > _BFLOAT16_MAX:
    raise _invalid(ValueError, name, f"must be finite (|value| <= {_BFLOAT16_MAX:.4g}, the "
                   "largest bfloat16)", value)


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  """Architecture of a Hyena language model (HyenaDNA layout).

  Attributes:
    vocab_size: number of real tokens; the embedding is padded to a multiple of
      `pad_vocab_size_multiple`.
    d_model: width of the residual stream (and of every long convolution).
    n_layer: number of residual blocks.
    d_inner: hidden width of each block's MLP.
    l_max: longest sequence the model accepts (length of the filter tables).
    order: Hyena order N >= 2; each layer runs N - 1 long convolutions.
    filter_order: width of the implicit filter MLP.
    emb_dim: width of the positional features fed to the filter MLP (odd, >= 3).
    short_filter_order: width of the short causal depthwise convolution.
    num_inner_mlps: hidden (width -> width) layers of the filter MLP.
    activation_freq: initial frequency of the filter MLP's `Sin` activation (any finite value).
    modulate: whether the filter is multiplied by an exponential decay window.
    modulation_shift: constant added to the decay window (any finite value: the window is
      `exp(-t |delta|) + modulation_shift`, finite for either sign).
    fast_decay_pct, slow_decay_pct, decay_target: initial decay rates, spread evenly between
      log(decay_target) / slow_decay_pct and log(decay_target) / fast_decay_pct; both
      percentages must be > 0 (in either order) and decay_target in (0, 1).
    layer_norm_epsilon: epsilon of every LayerNorm (> 0).
    pad_vocab_size_multiple: embedding rows are padded to a multiple of this.
    residual_in_fp32: keep the residual stream in float32 under bfloat16.

  Every field is checked on construction: a wrong kind (a bool or float for an integer, a bool
  or string for a float) raises `TypeError`, a value out of range (also NaN, inf, or a float
  beyond bfloat16's range) raises `ValueError`; both name the field and the value.
  """

  vocab_size: int = 12
  d_model: int = 128
  n_layer: int = 2
  d_inner: int = 512
  l_max: int = 1026
  order: int = 2
  filter_order: int = 64
  emb_dim: int = 5
  short_filter_order: int = 3
  num_inner_mlps: int = 2
  activation_freq: float = 10.0
  modulate: bool = True
  modulation_shift: float = 0.05
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  decay_target: float = 1e-2
  layer_norm_epsilon: float = 1e-5
  pad_vocab_size_multiple: int = 8
  residual_in_fp32: bool = True

  def __post_init__(self):
    """Checks every field's kind (`TypeError`) and range (`ValueError`), naming the field and
    the value: positive integer sizes, finite floats (within bfloat16/float32 range, since the
    parameters are made from them), and the ranges the model needs to stay finite."""
    for name in ("vocab_size", "d_model", "n_layer", "d_inner", "l_max", "filter_order",
                 "short_filter_order", "pad_vocab_size_multiple"):
      _check_int(name, getattr(self, name), 1, "a positive integer")
    _check_int("order", self.order, 2, "an integer >= 2")
    _check_int("emb_dim", self.emb_dim, 3, "odd and >= 3 (time, cosines, sines)")
    if self.emb_dim % 2 == 0:
      raise _invalid(ValueError, "emb_dim", "must be odd and >= 3 (time, cosines, sines)",
                     self.emb_dim)
    _check_int("num_inner_mlps", self.num_inner_mlps, 0, ">= 0")
    for name in ("modulate", "residual_in_fp32"):
      if not isinstance(getattr(self, name), bool):
        raise _invalid(TypeError, name, "must be True or False", getattr(self, name))
    for name in _FLOAT_FIELDS:
      _check_float(name, getattr(self, name))
    # Any finite frequency and shift give finite filters: the filter MLP computes
    # sin(freq * x) and the window is exp(-t |delta|) + modulation_shift (HyenaDNA's
    # ExponentialModulation), so a negative or zero shift is legal; it is not restricted.
    if not self.layer_norm_epsilon >= _FLOAT32_TINY:
      raise _invalid(ValueError, "layer_norm_epsilon",
                     f"must be > 0 (and >= {_FLOAT32_TINY:.3g}, else it is 0 in float32)",
                     self.layer_norm_epsilon)
    if not 0 < self.decay_target < 1:
      raise _invalid(ValueError, "decay_target",
                     "must lie in (0, 1) (the initial decay rates are log(decay_target) / "
                     "<fast|slow>_decay_pct: a decay needs a negative log)", self.decay_target)
    for name in ("fast_decay_pct", "slow_decay_pct"):
      value = getattr(self, name)
      if not value > 0:
        raise _invalid(ValueError, name, "must be > 0 (it divides log(decay_target))", value)
      # fast < slow is not needed: the rates are spread evenly between the two, either way.
      rate = math.log(self.decay_target) / value
      if not abs(rate) <= _BFLOAT16_MAX:
        raise _invalid(ValueError, name,
                       f"is too small: the initial decay rate log(decay_target) / {name} = "
                       f"{rate:.3g} overflows float32/bfloat16", value)

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the embedding table: `vocab_size` rounded up as HyenaDNA rounds it."""
    m = self.pad_vocab_size_multiple
    return int(math.ceil(self.vocab_size / m) * m)

  @property
  def num_convolutions(self) -> int:
    """Long convolutions per layer (N - 1)."""
    return self.order - 1

  @property
  def num_streams(self) -> int:
    """Long convolutions in the whole model: layers x (order - 1)."""
    return self.n_layer * self.num_convolutions

  def replace(self, **changes: Any) -> "HyenaConfig":
    return dataclasses.replace(self, **changes)

  # -- HyenaDNA `config.json` --------------------------------------------------

  @classmethod
  def from_hyenadna_dict(cls, raw: Mapping[str, Any]) -> "HyenaConfig":
    """Reads either the original (`layer` block) or the Hugging Face HyenaDNA format.

    Raises:
      ValueError: naming the field that is missing, has a value of the wrong kind, or a value
        out of range (as `HyenaConfig` checks it, under the HyenaDNA field's name, e.g.
        `layer.target` for `decay_target`).
    """
    if not isinstance(raw, Mapping):
      raise ValueError(f"a HyenaDNA config must be a JSON object (dict), got {type(raw).__name__}.")
    raw = dict(raw)
    if "layer" in raw:
      layer = raw["layer"]
      if not isinstance(layer, Mapping):
        raise ValueError(f"HyenaDNA config field 'layer' must be an object, got {layer!r}.")
      layer = dict(layer)
      name = layer.get("_name_", "hyena")
      if name != "hyena":
        raise ValueError(f"only Hyena mixers are supported, the config names {name!r}.")
      if raw.get("attn_layer_idx"):
        raise ValueError("configs with attention layers (attn_layer_idx) are not supported.")
      short = "short_filter_order" if "short_filter_order" in layer else "local_order"
      # Our field -> the HyenaDNA field it is read from (inside `layer`).
      keys = dict(l_max="l_max", order="order", filter_order="filter_order", emb_dim="emb_dim",
                  short_filter_order=short, num_inner_mlps="num_inner_mlps",
                  activation_freq="w", modulate="modulate",
                  # Keyword arguments of the reference's ExponentialModulation, where present.
                  modulation_shift="shift", fast_decay_pct="fast_decay_pct",
                  slow_decay_pct="slow_decay_pct", decay_target="target")
      keys = {ours: "layer." + theirs for ours, theirs in keys.items()}
      fields = dict(
          l_max=_int_field(layer, "l_max", where="layer."),
          order=_int_field(layer, "order", 2, where="layer."),
          filter_order=_int_field(layer, "filter_order", 64, where="layer."),
          emb_dim=_int_field(layer, "emb_dim", 3, where="layer."),
          short_filter_order=_int_field(layer, short, 3, where="layer."),
          num_inner_mlps=_int_field(layer, "num_inner_mlps", 2, where="layer."),
          activation_freq=_float_field(layer, "w", 1.0, where="layer."),
          modulate=_bool_field(layer, "modulate", True, where="layer."),
          modulation_shift=_float_field(layer, "shift", 0.05, where="layer."),
          fast_decay_pct=_float_field(layer, "fast_decay_pct", 0.3, where="layer."),
          slow_decay_pct=_float_field(layer, "slow_decay_pct", 1.5, where="layer."),
          decay_target=_float_field(layer, "target", 1e-2, where="layer."),
      )
    else:
      keys = dict(l_max="max_seq_len", order="hyena_order", filter_order="filter_order",
                  emb_dim="emb_dim", short_filter_order="short_filter_order",
                  num_inner_mlps="num_inner_mlps", activation_freq="activation_freq")
      fields = dict(
          l_max=_int_field(raw, "max_seq_len"),
          order=_int_field(raw, "hyena_order", 2),
          filter_order=_int_field(raw, "filter_order", 64),
          emb_dim=_int_field(raw, "emb_dim", 3),
          short_filter_order=_int_field(raw, "short_filter_order", 3),
          num_inner_mlps=_int_field(raw, "num_inner_mlps", 2),
          activation_freq=_float_field(raw, "activation_freq", 1.0),
      )
    d_model = _int_field(raw, "d_model")
    d_inner = _int_field(raw, "d_inner", None)
    keys.update(vocab_size="vocab_size", d_model="d_model", n_layer="n_layer",
                d_inner="d_inner" if d_inner is not None else "d_inner (absent: 4 * d_model)",
                layer_norm_epsilon="layer_norm_epsilon",
                pad_vocab_size_multiple="pad_vocab_size_multiple",
                residual_in_fp32="residual_in_fp32")
    fields.update(
        vocab_size=_int_field(raw, "vocab_size"),
        d_model=d_model,
        n_layer=_int_field(raw, "n_layer"),
        d_inner=d_inner if d_inner is not None else 4 * d_model,
        layer_norm_epsilon=_float_field(raw, "layer_norm_epsilon", 1e-5),
        pad_vocab_size_multiple=_int_field(raw, "pad_vocab_size_multiple", 1),
        residual_in_fp32=_bool_field(raw, "residual_in_fp32", True),
    )
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      field = getattr(e, "field", None)
      if field is None:
        raise
      # Name the field as the HyenaDNA config spells it (`layer.target`, ...), then ours.
      raise type(e)(f"HyenaDNA config field {keys.get(field, field)!r}: {e}") from None

  def to_hyenadna_dict(self) -> dict[str, Any]:
    """The original HyenaDNA `config.json` layout (the one `from_hyenadna_dict` reads)."""
    return {
        "d_model": self.d_model,
        "n_layer": self.n_layer,
        "d_inner": self.d_inner,
        "vocab_size": self.vocab_size,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "residual_in_fp32": self.residual_in_fp32,
        "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
        "layer": {
            "_name_": "hyena",
            "emb_dim": self.emb_dim,
            "filter_order": self.filter_order,
            "short_filter_order": self.short_filter_order,
            "num_inner_mlps": self.num_inner_mlps,
            "l_max": self.l_max,
            "modulate": self.modulate,
            "w": self.activation_freq,
            "order": self.order,
            "shift": self.modulation_shift,
            "fast_decay_pct": self.fast_decay_pct,
            "slow_decay_pct": self.slow_decay_pct,
            "target": self.decay_target,
        },
    }

  @classmethod
  def from_json_file(cls, path: str | os.PathLike[str]) -> "HyenaConfig":
    """Reads a HyenaDNA `config.json`; `ValueError` names the file and what is wrong with it."""
    try:
      with open(path, "rb") as f:
        data = f.read()
    except IsADirectoryError:
      raise ValueError(f"{path}: is a directory, not a config.json file.") from None
    return cls.from_json_bytes(data, source=path)

  @classmethod
  def from_json_bytes(cls, data: bytes,
                      source: str | os.PathLike[str] = "config.json") -> "HyenaConfig":
    """Parses the bytes of a HyenaDNA `config.json` (UTF-8); `ValueError` names `source` and
    what is wrong with it. Lets a reader parse exactly the bytes it has hashed."""
    try:
      raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{source}: not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
      raise ValueError(f"{source}: a HyenaDNA config must be a JSON object, got "
                       f"{type(raw).__name__}.")
    try:
      return cls.from_hyenadna_dict(raw)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None


_REQUIRED = object()


def _field(raw: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
  if key in raw and raw[key] is not None:
    return raw[key]
  if default is _REQUIRED:
    raise ValueError(f"HyenaDNA config is missing the field {where + key!r}.")
  return default


def _int_field(raw: Mapping[str, Any], key: str, default: Any = _REQUIRED,
               where: str = "") -> Any:
  value = _field(raw, key, default, where)
  if value is default:
    return value
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"HyenaDNA config field {where + key!r} must be an integer, got {value!r}.")
  return value


def _float_field(raw: Mapping[str, Any], key: str, default: Any = _REQUIRED,
                 where: str = "") -> Any:
  value = _field(raw, key, default, where)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"HyenaDNA config field {where + key!r} must be a number, got {value!r}.")
  try:
    return float(value)
  except OverflowError:  # an integer literal beyond float's range: refused as inf is
    return math.inf


def _bool_field(raw: Mapping[str, Any], key: str, default: Any = _REQUIRED,
                where: str = "") -> Any:
  value = _field(raw, key, default, where)
  if not isinstance(value, bool):
    raise ValueError(f"HyenaDNA config field {where + key!r} must be true or false, got {value!r}.")
  return value


# Published HyenaDNA sizes (LongSafari/hyenadna-*-seqlen on the Hugging Face hub).
_HYENADNA_COMMON = dict(vocab_size=12, emb_dim=5, filter_order=64, short_filter_order=3,
                        activation_freq=10.0, pad_vocab_size_multiple=8)

PRESETS: dict[str, HyenaConfig] = {
    "tiny-1k": HyenaConfig(d_model=128, n_layer=2, d_inner=512, l_max=1026,
                           **_HYENADNA_COMMON),
    "tiny-1k-d256": HyenaConfig(d_model=256, n_layer=2, d_inner=1024, l_max=1026,
                                **_HYENADNA_COMMON),
    "tiny-16k-d128": HyenaConfig(d_model=128, n_layer=2, d_inner=512, l_max=16386,
                                 **_HYENADNA_COMMON),
    "small-32k": HyenaConfig(d_model=256, n_layer=4, d_inner=1024, l_max=32770,
                             **_HYENADNA_COMMON),
    "medium-160k": HyenaConfig(d_model=256, n_layer=8, d_inner=1024, l_max=160002,
                               **_HYENADNA_COMMON),
    "medium-450k": HyenaConfig(d_model=256, n_layer=8, d_inner=1024, l_max=450002,
                               **_HYENADNA_COMMON),
    "large-1m": HyenaConfig(d_model=256, n_layer=8, d_inner=1024, l_max=1_000_002,
                            **_HYENADNA_COMMON),
}


def preset(name: str, **changes: Any) -> HyenaConfig:
  """A published HyenaDNA size by name (see `PRESETS`), optionally with fields changed."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}.")
  return PRESETS[name].replace(**changes) if changes else PRESETS[name]
