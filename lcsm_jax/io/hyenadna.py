"""HyenaDNA checkpoints (PyTorch state dicts) in: the state-dict layout, its conversion to this
project's parameters, the readers of safetensors / npz / torch weights and of config.json.

A HyenaDNA checkpoint is a `config.json` plus a state dict stored as safetensors, as an `.npz`
of the state dict, or as a PyTorch `.bin`/`.pt` (read only where torch is installed). Every
tensor is checked by name and shape before anything is returned: nothing loads half.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from lcsm_jax import validation
from lcsm_jax.errors import CheckpointError
from lcsm_jax.models.hyena.config import HyenaConfig

PathLike = str | os.PathLike[str]
Params = dict[str, Any]

WEIGHT_FILES = ("model.safetensors", "weights.npz", "model.npz", "pytorch_model.bin", "model.bin")
_PREFIXES = ("", "hyena.", "model.", "module.")


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
      "mixer.filter_fn.pos_emb.z":
          ((1, cfg.l_max, cfg.emb_dim), ("mixer", "filter", "z"), "squeeze0"),
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
    per_layer[f"{prefix}.weight"] = (
        (fo, fan_in), ("mixer", "filter", f"dense_{i}", "kernel"), "linear")
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
  """Accepts the keys with any one of the wrappers HyenaDNA checkpoints use ('hyena.', ...).

  A language-model head (`lm_head.*`, as in the Hugging Face port, whose backbone sits under
  'hyena.') is left out when looking for the common prefix.
  """
  body = [k for k in state if not k.startswith("lm_head.")]
  for prefix in _PREFIXES:
    if prefix and body and all(k.startswith(prefix) for k in body):
      return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
  return dict(state)


def params_from_state_dict(cfg: HyenaConfig, state: Mapping[str, Any]) -> Params:
  """Converts a HyenaDNA PyTorch state dict (NumPy arrays) into this project's parameters.

  The values keep their stored dtype. A `lm_head.weight` is accepted only if it equals the
  embedding (the model ties its head to the embedding).

  Raises:
    CheckpointError: naming every missing, unexpected, mis-shaped, non-floating or non-finite
      tensor, an untied head, and every `Sin` frequency that differs between the filter MLP's
      activations (the reference shares one).
  """
  if not isinstance(state, Mapping):
    raise CheckpointError(f"a state dict must be a mapping of names to arrays, got "
                          f"{type(state).__name__}.")
  arrays = {}
  for k, v in state.items():
    try:
      arrays[str(k)] = np.asarray(v)
    except Exception as e:
      raise CheckpointError(f"tensor {k!r} cannot be read as an array ({e}).") from None
  state = _strip_prefix(arrays)
  head = state.pop("lm_head.weight", None)
  layout = _torch_layout(cfg)
  problems = validation.name_problems(layout, state, "tensors")
  for key in sorted(set(layout) & set(state)):
    shape = layout[key][0]
    if tuple(state[key].shape) != shape:
      problems.append(f"{key} has shape {tuple(state[key].shape)}, the config expects {shape}")
    elif not validation.is_float(state[key].dtype):
      problems.append(f"{key} has dtype {state[key].dtype}, expected a floating-point tensor")
    elif not np.isfinite(state[key].astype(np.float32)).all():
      problems.append(f"{key} holds non-finite values (NaN or inf)")
  embedding_key = "backbone.embeddings.word_embeddings.weight"
  if head is not None and embedding_key in state and not problems:
    if head.shape != state[embedding_key].shape or not np.array_equal(head, state[embedding_key]):
      problems.append(f"lm_head.weight {tuple(head.shape)} differs from {embedding_key}; this "
                      "model ties the output head to the embedding and cannot load an untied head")
  if not problems:
    problems += _shared_freq_problems(cfg, state, layout)
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
      continue  # equal to the first one (checked by _shared_freq_problems)
    slots[layer] = value
  flat = {("params",) + path: value for path, value in top.items()}
  for path, slots in per_layer.items():
    flat[("params", "stack", "blocks") + path] = np.stack(slots)
  return traverse_util.unflatten_dict(flat)


def _shared_freq_problems(cfg: HyenaConfig, state: Mapping[str, np.ndarray],
                          layout: Mapping[str, Any]) -> list[str]:
  """The reference shares one `Sin` module (one `freq`) between the filter MLP's activations;
  this model stores one frequency vector per layer, so every copy must be equal."""
  problems = []
  for layer in range(cfg.n_layer):
    keys = [k for k, spec in layout.items()
            if spec[2] == "shared_freq" and k.startswith(f"backbone.layers.{layer}.")]
    first = state[keys[0]]
    for key in keys[1:]:
      if not np.array_equal(state[key], first):
        problems.append(
            f"{key} differs from {keys[0]}: the filter MLP's Sin frequencies differ between "
            "activations; the HyenaDNA reference shares one frequency vector, which this "
            "model assumes")
  return problems


def _read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise CheckpointError(f"{path}: the weights are not a regular file.")
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
          "'model.safetensors')\n"
          "and load the directory holding model.safetensors and config.json.") from None
    try:
      state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
      raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e}).") from None
    if isinstance(state, dict) and "state_dict" in state:
      state = state["state_dict"]
    if not isinstance(state, Mapping):
      raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}.")
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  raise CheckpointError(f"{path}: unknown weight format {suffix!r}; expected .safetensors, .npz, "
                        ".bin or .pt.")


def read_config_bytes(path: pathlib.Path) -> bytes:
  """The bytes of a `config.json`, every problem reported as a `CheckpointError`."""
  if not path.is_file():
    raise CheckpointError(f"no config.json in {path.parent} (expected {path}).")
  try:
    return path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e}).") from None


def parse_config(path: pathlib.Path, data: bytes) -> HyenaConfig:
  """`HyenaConfig.from_json_bytes`, with every problem reported as a `CheckpointError`."""
  try:
    return HyenaConfig.from_json_bytes(data, source=path)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def read_config(path: pathlib.Path) -> HyenaConfig:
  """`HyenaConfig.from_json_file`, with every problem reported as a `CheckpointError`."""
  return parse_config(path, read_config_bytes(path))


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


def load_hyenadna(path: PathLike, *, dtype: Any = np.float32) -> tuple[HyenaConfig, Params]:
  """Loads a HyenaDNA checkpoint: a directory with `config.json` and weights, or a weight file
  with `config.json` beside it.

  Args:
    path: the directory, or the weight file (.safetensors, .npz, or .bin/.pt with torch).
    dtype: dtype of the returned parameters (float32 by default); None keeps the stored ones.
      For bfloat16 use `lcsm_jax.cast_params`, which keeps the positional tables float32.

  Returns:
    (config, params) where `params` is `{'params': ...}` of NumPy arrays for
    `HyenaLM(config).apply`.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: a missing or malformed config.json, unreadable weights, or weights that do
      not match the config (every offending tensor is named). Nothing is returned half-loaded.
  """
  config_path, weights_path = _find_files(pathlib.Path(path))
  config = read_config(config_path)
  params = params_from_state_dict(config, _read_state_dict(weights_path))
  if dtype is not None:
    return config, jax.tree.map(lambda x: np.asarray(x, dtype), params)
  return config, jax.tree.map(np.asarray, params)
