"""Typed configuration of a Hyena language model, and the published HyenaDNA sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping


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
    activation_freq: initial frequency of the filter MLP's `Sin` activation.
    modulate: whether the filter is multiplied by an exponential decay window.
    modulation_shift: constant added to the decay window.
    fast_decay_pct, slow_decay_pct, decay_target: initial decay rates.
    layer_norm_epsilon: epsilon of every LayerNorm.
    pad_vocab_size_multiple: embedding rows are padded to a multiple of this.
    residual_in_fp32: keep the residual stream in float32 under bfloat16.
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
    positive = ("vocab_size", "d_model", "n_layer", "d_inner", "l_max",
                "filter_order", "short_filter_order", "pad_vocab_size_multiple")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"HyenaConfig.{name} must be a positive integer, got {value!r}.")
    if not isinstance(self.order, int) or self.order < 2:
      raise ValueError(f"HyenaConfig.order must be an integer >= 2, got {self.order!r}.")
    if self.emb_dim < 3 or self.emb_dim % 2 == 0:
      raise ValueError(
          f"HyenaConfig.emb_dim must be odd and >= 3 (time, cosines, sines), got {self.emb_dim}.")
    if self.num_inner_mlps < 0:
      raise ValueError(f"HyenaConfig.num_inner_mlps must be >= 0, got {self.num_inner_mlps}.")

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
    """Reads either the original (`layer` block) or the Hugging Face HyenaDNA format."""
    raw = dict(raw)
    try:
      if "layer" in raw:
        layer = dict(raw["layer"])
        name = layer.get("_name_", "hyena")
        if name != "hyena":
          raise ValueError(f"only Hyena mixers are supported, the config names {name!r}.")
        if raw.get("attn_layer_idx"):
          raise ValueError("configs with attention layers (attn_layer_idx) are not supported.")
        fields = dict(
            l_max=int(layer["l_max"]),
            order=int(layer.get("order", 2)),
            filter_order=int(layer.get("filter_order", 64)),
            emb_dim=int(layer.get("emb_dim", 3)),
            short_filter_order=int(layer.get("short_filter_order",
                                             layer.get("local_order", 3))),
            num_inner_mlps=int(layer.get("num_inner_mlps", 2)),
            activation_freq=float(layer.get("w", 1.0)),
            modulate=bool(layer.get("modulate", True)),
        )
      else:
        fields = dict(
            l_max=int(raw["max_seq_len"]),
            order=int(raw.get("hyena_order", 2)),
            filter_order=int(raw.get("filter_order", 64)),
            emb_dim=int(raw.get("emb_dim", 3)),
            short_filter_order=int(raw.get("short_filter_order", 3)),
            num_inner_mlps=int(raw.get("num_inner_mlps", 2)),
            activation_freq=float(raw.get("activation_freq", 1.0)),
        )
      d_model = int(raw["d_model"])
      d_inner = raw.get("d_inner")
      return cls(
          vocab_size=int(raw["vocab_size"]),
          d_model=d_model,
          n_layer=int(raw["n_layer"]),
          d_inner=int(d_inner) if d_inner is not None else 4 * d_model,
          layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
          pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 1)),
          residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
          **fields,
      )
    except KeyError as e:
      raise ValueError(f"HyenaDNA config is missing the field {e.args[0]!r}.") from None

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
        },
    }

  @classmethod
  def from_json_file(cls, path: str | os.PathLike[str]) -> "HyenaConfig":
    with open(path) as f:
      try:
        raw = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
      raise ValueError(f"{path}: a HyenaDNA config must be a JSON object.")
    return cls.from_hyenadna_dict(raw)


# Published HyenaDNA sizes (LongSafari/hyenadna-*-seqlen on the Hugging Face hub).
_HYENADNA_COMMON = dict(vocab_size=12, emb_dim=5, filter_order=64, short_filter_order=3,
                        activation_freq=10.0, pad_vocab_size_multiple=8)

PRESETS: dict[str, HyenaConfig] = {
    "tiny-1k": HyenaConfig(d_model=128, n_layer=2, d_inner=512, l_max=1026, **_HYENADNA_COMMON),
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
