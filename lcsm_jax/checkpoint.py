"""Checkpoints: HyenaDNA (PyTorch state dicts) in, and the project's own parameters in and out.

A HyenaDNA checkpoint is a `config.json` plus a state dict stored as safetensors, as an `.npz`
of the state dict, or as a PyTorch `.bin`/`.pt` (read only where torch is installed). Every
tensor is checked by name and shape before anything is returned: nothing loads half.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from lcsm_jax.config import HyenaConfig

PathLike = str | os.PathLike[str]
Params = dict[str, Any]

WEIGHT_FILES = ("model.safetensors", "weights.npz", "model.npz", "pytorch_model.bin", "model.bin")
_PREFIXES = ("", "hyena.", "model.", "module.")


class CheckpointError(ValueError):
  """A checkpoint does not match the model it claims to describe."""


def _torch_layout(cfg: HyenaConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  """Every state-dict key of one HyenaDNA model -> (shape, our parameter path, conversion)."""
  d, n, k = cfg.d_model, cfg.order, cfg.short_filter_order
  width, fo = (n + 1) * d, cfg.filter_order
  nf = cfg.num_convolutions * d
  keys: dict[str, tuple[tuple[int, ...], tuple[str, ...], str]] = {
      "backbone.embeddings.word_embeddings.weight":
          ((cfg.padded_vocab_size, d), ("embedder", "embedding"), "copy"),
      "backbone.ln_f.weight": ((d,), ("ln_f", "scale"), "copy"),
      "backbone.ln_f.bias": ((d,), ("ln_f", "bias"), "copy"),
  }
  per_layer = {
      "norm1.weight": ((d,), ("norm1", "scale"), "copy"),
      "norm1.bias": ((d,), ("norm1", "bias"), "copy"),
      "norm2.weight": ((d,), ("norm2", "scale"), "copy"),
      "norm2.bias": ((d,), ("norm2", "bias"), "copy"),
      "mixer.in_proj.weight": ((width, d), ("mixer", "in_proj", "kernel"), "linear"),
      "mixer.in_proj.bias": ((width,), ("mixer", "in_proj", "bias"), "copy"),
      "mixer.out_proj.weight": ((d, d), ("mixer", "out_proj", "kernel"), "linear"),
      "mixer.out_proj.bias": ((d,), ("mixer", "out_proj", "bias"), "copy"),
      "mixer.short_filter.weight": ((width, 1, k), ("mixer", "short_conv", "kernel"), "conv"),
      "mixer.short_filter.bias": ((width,), ("mixer", "short_conv", "bias"), "copy"),
      "mixer.filter_fn.bias": ((nf,), ("mixer", "filter", "bias"), "copy"),
      "mixer.filter_fn.modulation.deltas": ((1, 1, nf), ("mixer", "filter", "deltas"), "flat"),
      "mixer.filter_fn.pos_emb.z": ((1, cfg.l_max, cfg.emb_dim), ("mixer", "filter", "z"), "squeeze0"),
      "mixer.filter_fn.pos_emb.t": ((1, cfg.l_max, 1), ("mixer", "filter", "t"), "squeeze0"),
      "mlp.fc1.weight": ((cfg.d_inner, d), ("mlp", "fc1", "kernel"), "linear"),
      "mlp.fc1.bias": ((cfg.d_inner,), ("mlp", "fc1", "bias"), "copy"),
      "mlp.fc2.weight": ((d, cfg.d_inner), ("mlp", "fc2", "kernel"), "linear"),
      "mlp.fc2.bias": ((d,), ("mlp", "fc2", "bias"), "copy"),
  }
  # implicit_filter = [Linear, Sin, (Linear, Sin) * num_inner_mlps, Linear(no bias)].
  in_dims = [cfg.emb_dim] + [fo] * cfg.num_inner_mlps
  for i, fan_in in enumerate(in_dims):
    prefix = f"mixer.filter_fn.implicit_filter.{2 * i}"
    per_layer[f"{prefix}.weight"] = ((fo, fan_in), ("mixer", "filter", f"dense_{i}", "kernel"), "linear")
    per_layer[f"{prefix}.bias"] = ((fo,), ("mixer", "filter", f"dense_{i}", "bias"), "copy")
    per_layer[f"mixer.filter_fn.implicit_filter.{2 * i + 1}.freq"] = (
        (1, fo), ("mixer", "filter", "freq"), "shared_freq")
  last = 2 * (cfg.num_inner_mlps + 1)
  per_layer[f"mixer.filter_fn.implicit_filter.{last}.weight"] = (
      (nf, fo), ("mixer", "filter", "output", "kernel"), "linear")
  for layer in range(cfg.n_layer):
    for key, spec in per_layer.items():
      keys[f"backbone.layers.{layer}.{key}"] = spec
  return keys


def _convert(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return value.T
  if kind == "conv":
    return value[:, 0, :].T
  if kind in ("flat", "shared_freq"):
    return value.reshape(-1)
  if kind == "squeeze0":
    return value[0]
  return value


def _strip_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Accepts the keys with any one of the wrappers HyenaDNA checkpoints use ('hyena.', ...)."""
  for prefix in _PREFIXES:
    if prefix and all(k.startswith(prefix) for k in state):
      return {k[len(prefix):]: v for k, v in state.items()}
  return dict(state)


def params_from_state_dict(cfg: HyenaConfig, state: Mapping[str, Any]) -> Params:
  """Converts a HyenaDNA PyTorch state dict (NumPy arrays) into this project's parameters.

  Raises:
    CheckpointError: naming every missing, unexpected or mis-shaped tensor, and any `Sin`
      frequency that differs between the MLP's activations (the reference shares one).
  """
  state = _strip_prefix({k: np.asarray(v) for k, v in state.items()})
  state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}  # tied to embeddings
  layout = _torch_layout(cfg)
  problems = []
  missing = sorted(set(layout) - set(state))
  unexpected = sorted(set(state) - set(layout))
  if missing:
    problems.append("missing tensors: " + ", ".join(missing))
  if unexpected:
    problems.append("unexpected tensors: " + ", ".join(unexpected))
  for key in sorted(set(layout) & set(state)):
    shape = layout[key][0]
    if tuple(state[key].shape) != shape:
      problems.append(f"{key} has shape {tuple(state[key].shape)}, the config expects {shape}")
    elif not np.issubdtype(state[key].dtype, np.floating):
      problems.append(f"{key} has dtype {state[key].dtype}, expected a floating-point tensor")
  if problems:
    raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

  per_layer: dict[tuple[str, ...], list[np.ndarray | None]] = {}
  top: dict[tuple[str, ...], np.ndarray] = {}
  layer_key = re.compile(r"backbone\.layers\.(\d+)\.")
  for key, (_, path, kind) in layout.items():
    value = _convert(kind, state[key])
    match = layer_key.match(key)
    if match is None:
      top[path] = value
      continue
    slots = per_layer.setdefault(path, [None] * cfg.n_layer)
    layer = int(match.group(1))
    if kind == "shared_freq" and slots[layer] is not None:
      if not np.array_equal(slots[layer], value):
        raise CheckpointError(
            f"{key}: the filter MLP's Sin frequencies differ between activations; the "
            "HyenaDNA reference shares one frequency vector, which this model assumes.")
      continue
    slots[layer] = value
  flat = {("params",) + path: value for path, value in top.items()}
  for path, slots in per_layer.items():
    flat[("params", "stack", "blocks") + path] = np.stack(slots)
  return traverse_util.unflatten_dict(flat)


def _read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from None
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except Exception as e:
      raise CheckpointError(f"{path}: not a readable .npz file ({e}).") from None
  if suffix in (".bin", ".pt", ".pth", ".ckpt"):
    try:
      import torch  # pytype: disable=import-error
    except ImportError:
      raise CheckpointError(
          f"{path} is a PyTorch checkpoint and torch is not installed. Either install torch, or "
          "convert it once where torch is available:\n"
          "  import torch, safetensors.torch\n"
          f"  sd = torch.load('{path.name}', map_location='cpu')\n"
          "  sd = sd.get('state_dict', sd)\n"
          "  safetensors.torch.save_file({k: v.float().contiguous() for k, v in sd.items()}, "
          "'model.safetensors')") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
      state = state["state_dict"]
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  raise CheckpointError(f"{path}: unknown weight format {suffix!r}; expected .safetensors, .npz, "
                        ".bin or .pt.")


def _find_files(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}.")
  if path.is_dir():
    config = path / "config.json"
    weights = next((path / name for name in WEIGHT_FILES if (path / name).exists()), None)
    if weights is None:
      raise CheckpointError(f"{path} holds none of the weight files {', '.join(WEIGHT_FILES)}.")
  else:
    weights, config = path, path.parent / "config.json"
  if not config.exists():
    raise CheckpointError(f"no config.json beside the weights in {config.parent}.")
  return config, weights


def load_hyenadna(path: PathLike) -> tuple[HyenaConfig, Params]:
  """Loads a HyenaDNA checkpoint: a directory with `config.json` and weights, or a weight file
  with `config.json` beside it.

  Returns:
    (config, params) where `params` is `{'params': ...}` for `HyenaLM(config).apply`.
  """
  config_path, weights_path = _find_files(pathlib.Path(path))
  config = HyenaConfig.from_json_file(config_path)
  params = params_from_state_dict(config, _read_state_dict(weights_path))
  return config, jax.tree.map(np.asarray, params)


# -- The project's own format: config.json + params.safetensors (flattened '/'-joined keys). --

OWN_WEIGHTS = "params.safetensors"


def save_params(path: PathLike, config: HyenaConfig, params: Params,
                metadata: Mapping[str, str] | None = None) -> None:
  """Writes `config.json` and `params.safetensors` into directory `path`."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep="/")
  arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flat.items()}
  (path / "config.json").write_text(json.dumps(config.to_hyenadna_dict(), indent=2) + "\n")
  save_file(arrays, str(path / OWN_WEIGHTS), metadata=dict(metadata or {}))


def load_params(path: PathLike) -> tuple[HyenaConfig, Params]:
  """Reads a directory written by `save_params`, checking every array against the config."""
  from safetensors.numpy import load_file
  path = pathlib.Path(path)
  if not (path / OWN_WEIGHTS).exists():
    raise CheckpointError(f"{path} has no {OWN_WEIGHTS}.")
  config = HyenaConfig.from_json_file(path / "config.json")
  try:
    flat = load_file(str(path / OWN_WEIGHTS))
  except Exception as e:
    raise CheckpointError(f"{path / OWN_WEIGHTS}: not a readable safetensors file ({e}).") from None
  params = traverse_util.unflatten_dict(flat, sep="/")
  check_params(config, params)
  return config, params


def check_params(config: HyenaConfig, params: Params) -> None:
  """Raises `CheckpointError` naming every parameter whose path or shape does not fit `config`."""
  from lcsm_jax.model import HyenaLM  # local: model imports nothing from here
  import jax.numpy as jnp
  expected = jax.eval_shape(
      lambda: HyenaLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  want = traverse_util.flatten_dict(expected, sep="/")
  try:
    got = traverse_util.flatten_dict(params, sep="/")
  except Exception:
    raise CheckpointError("parameters must be a nested dict {'params': {...}}.") from None
  problems = []
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if missing:
    problems.append("missing parameters: " + ", ".join(missing))
  if unexpected:
    problems.append("unexpected parameters: " + ", ".join(unexpected))
  for key in sorted(set(want) & set(got)):
    if tuple(np.shape(got[key])) != tuple(want[key].shape):
      problems.append(f"{key} has shape {tuple(np.shape(got[key]))}, the config expects "
                      f"{tuple(want[key].shape)}")
  if problems:
    raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems))
