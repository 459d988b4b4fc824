"""Checkpoints: HyenaDNA (PyTorch state dicts) in, and the project's own parameters in and out.

A HyenaDNA checkpoint is a `config.json` plus a state dict stored as safetensors, as an `.npz`
of the state dict, or as a PyTorch `.bin`/`.pt` (read only where torch is installed). Every
tensor is checked by name and shape before anything is returned: nothing loads half.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import stat
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
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
  """Accepts the keys with any one of the wrappers HyenaDNA checkpoints use ('hyena.', ...).

  A language-model head (`lm_head.*`, as in the Hugging Face port, whose backbone sits under
  'hyena.') is left out when looking for the common prefix.
  """
  body = [k for k in state if not k.startswith("lm_head.")]
  for prefix in _PREFIXES:
    if prefix and body and all(k.startswith(prefix) for k in body):
      return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
  return dict(state)


def _name_problems(want, got, noun: str) -> list[str]:
  """Messages naming every key of `want` missing from `got` and every unexpected key."""
  problems = []
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if missing:
    problems.append(f"missing {noun}: " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected {noun}: " + ", ".join(unexpected))
  return problems


def _is_float(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)  # unlike NumPy's, also true for bfloat16


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
  problems = _name_problems(layout, state, "tensors")
  for key in sorted(set(layout) & set(state)):
    shape = layout[key][0]
    if tuple(state[key].shape) != shape:
      problems.append(f"{key} has shape {tuple(state[key].shape)}, the config expects {shape}")
    elif not _is_float(state[key].dtype):
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


def _read_config(path: pathlib.Path) -> HyenaConfig:
  """`HyenaConfig.from_json_file`, with every problem reported as a `CheckpointError`."""
  if not path.is_file():
    raise CheckpointError(f"no config.json in {path.parent} (expected {path}).")
  try:
    return HyenaConfig.from_json_file(path)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e}).") from None
  except ValueError as e:
    raise CheckpointError(str(e)) from None


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
      For bfloat16 use `lcsm_jax.model.cast_params`, which keeps the positional tables float32.

  Returns:
    (config, params) where `params` is `{'params': ...}` of NumPy arrays for
    `HyenaLM(config).apply`.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: a missing or malformed config.json, unreadable weights, or weights that do
      not match the config (every offending tensor is named). Nothing is returned half-loaded.
  """
  config_path, weights_path = _find_files(pathlib.Path(path))
  config = _read_config(config_path)
  params = params_from_state_dict(config, _read_state_dict(weights_path))
  if dtype is not None:
    return config, jax.tree.map(lambda x: np.asarray(x, dtype), params)
  return config, jax.tree.map(np.asarray, params)


# -- The project's own format: config.json + params.safetensors (flattened '/'-joined keys). --

OWN_WEIGHTS = "params.safetensors"
# Metadata key listing the arrays stored as float32 because this safetensors cannot store
# bfloat16 from NumPy; they are cast back to bfloat16 on load.
BFLOAT16_AS_FLOAT32 = "lcsm_jax.bfloat16_stored_as_float32"


@functools.cache
def _safetensors_stores_bfloat16() -> bool:
  from safetensors.numpy import save
  try:
    save({"x": np.zeros((1,), jnp.bfloat16)})
    return True
  except Exception:
    return False


def save_params(path: PathLike, config: HyenaConfig, params: Params,
                metadata: Mapping[str, str] | None = None) -> None:
  """Writes `config.json` and `params.safetensors` into directory `path`.

  The parameters are checked against `config` first (`check_params`); both files are written
  to temporary names and then renamed, so an interrupted save leaves no half-written file.
  bfloat16 arrays are stored as bfloat16 where safetensors can, else as float32 listed under
  the metadata key `BFLOAT16_AS_FLOAT32` (and cast back by `load_params`).
  """
  from safetensors.numpy import save_file
  check_params(config, params)
  metadata = dict(metadata or {})
  bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
  if bad:
    raise TypeError(f"safetensors metadata must map str to str; not so for {bad}.")
  if BFLOAT16_AS_FLOAT32 in metadata:
    raise ValueError(f"the metadata key {BFLOAT16_AS_FLOAT32!r} is reserved.")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep="/")
  arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flat.items()}
  widened = sorted(k for k, v in arrays.items() if v.dtype == jnp.bfloat16)
  if widened and not _safetensors_stores_bfloat16():
    arrays.update({k: arrays[k].astype(np.float32) for k in widened})
    metadata[BFLOAT16_AS_FLOAT32] = ",".join(widened)
  config_text = json.dumps(config.to_hyenadna_dict(), indent=2) + "\n"
  with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
    save_file(arrays, os.path.join(tmp, OWN_WEIGHTS), metadata=metadata)
    pathlib.Path(tmp, "config.json").write_text(config_text)
    # safetensors creates its file with mode 0600; give it the mode an ordinary new file gets
    # (0666 less the umask, as config.json just got), so others can read the checkpoint.
    weights_tmp, config_tmp = os.path.join(tmp, OWN_WEIGHTS), os.path.join(tmp, "config.json")
    os.chmod(weights_tmp, stat.S_IMODE(os.stat(config_tmp).st_mode))
    os.replace(weights_tmp, path / OWN_WEIGHTS)
    os.replace(config_tmp, path / "config.json")


def read_metadata(path: PathLike) -> dict[str, str]:
  """The metadata `save_params` stored in `path/params.safetensors` (without internal keys)."""
  from safetensors import safe_open
  weights = pathlib.Path(path) / OWN_WEIGHTS
  if not weights.is_file():
    raise CheckpointError(f"{path} has no {OWN_WEIGHTS}.")
  try:
    with safe_open(str(weights), framework="np") as f:
      metadata = dict(f.metadata() or {})
  except Exception as e:
    raise CheckpointError(f"{weights}: not a readable safetensors file ({e}).") from None
  metadata.pop(BFLOAT16_AS_FLOAT32, None)
  return metadata


def load_params(path: PathLike) -> tuple[HyenaConfig, Params]:
  """Reads a directory written by `save_params`, checking every array against the config.

  Returns:
    (config, params): the parameters as NumPy arrays in the dtypes they were saved with.
  """
  from safetensors import safe_open
  path = pathlib.Path(path)
  weights = path / OWN_WEIGHTS
  if not weights.is_file():
    raise CheckpointError(f"{path} has no {OWN_WEIGHTS}.")
  config = _read_config(path / "config.json")
  try:
    with safe_open(str(weights), framework="np") as f:
      metadata = dict(f.metadata() or {})
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise CheckpointError(f"{weights}: not a readable safetensors file ({e}).") from None
  for key in filter(None, metadata.get(BFLOAT16_AS_FLOAT32, "").split(",")):
    if key not in flat:
      raise CheckpointError(f"{weights}: metadata lists {key!r} as bfloat16, but there is no "
                            "such array.")
    flat[key] = flat[key].astype(jnp.bfloat16)
  params = traverse_util.unflatten_dict(flat, sep="/")
  check_params(config, params)
  return config, params


@functools.lru_cache(maxsize=32)
def _expected_shapes(config: HyenaConfig) -> dict[str, tuple[int, ...]]:
  from lcsm_jax.model import HyenaLM  # local: model imports nothing from here at load time
  expected = jax.eval_shape(
      lambda: HyenaLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}


def check_params(config: HyenaConfig, params: Params) -> None:
  """Raises `CheckpointError` naming every parameter whose path, shape or dtype (floating
  point) does not fit `config`."""
  want = _expected_shapes(config)
  if not isinstance(params, Mapping):
    raise CheckpointError(f"parameters must be a nested dict {{'params': {{...}}}}, got "
                          f"{type(params).__name__}.")
  if "params" not in params and "embedder" in params:
    raise CheckpointError("parameters must be wrapped as {'params': ...}: the given dict looks "
                          "like its inner part (it has 'embedder' at the top).")
  try:
    got = traverse_util.flatten_dict(params, sep="/")
  except Exception:
    raise CheckpointError("parameters must be a nested dict {'params': {...}}.") from None
  problems = _name_problems(want, got, "parameters")
  for key in sorted(set(want) & set(got)):
    shape = tuple(np.shape(got[key]))
    dtype = getattr(got[key], "dtype", None)
    if dtype is None:
      dtype = np.asarray(got[key]).dtype
    if shape != want[key]:
      problems.append(f"{key} has shape {shape}, the config expects {want[key]}")
    elif not _is_float(dtype):
      problems.append(f"{key} has dtype {dtype}, expected a floating-point array")
  if problems:
    raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems))
