"""Checkpoints: HyenaDNA (PyTorch state dicts) in, and the project's own parameters in and out.

A HyenaDNA checkpoint is a `config.json` plus a state dict stored as safetensors, as an `.npz`
of the state dict, or as a PyTorch `.bin`/`.pt` (read only where torch is installed). Every
tensor is checked by name and shape before anything is returned: nothing loads half.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import re
import stat
import tempfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcsm_jax.config import HyenaConfig

try:
  import fcntl
except ImportError:  # not POSIX: saves and loads run without directory locks
  fcntl = None

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


def _read_config_bytes(path: pathlib.Path) -> bytes:
  """The bytes of a `config.json`, every problem reported as a `CheckpointError`."""
  if not path.is_file():
    raise CheckpointError(f"no config.json in {path.parent} (expected {path}).")
  try:
    return path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e}).") from None


def _parse_config(path: pathlib.Path, data: bytes) -> HyenaConfig:
  """`HyenaConfig.from_json_bytes`, with every problem reported as a `CheckpointError`."""
  try:
    return HyenaConfig.from_json_bytes(data, source=path)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _read_config(path: pathlib.Path) -> HyenaConfig:
  """`HyenaConfig.from_json_file`, with every problem reported as a `CheckpointError`."""
  return _parse_config(path, _read_config_bytes(path))


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
# Metadata key holding the SHA-256 (hex) of the exact config.json bytes saved with the weights:
# `load_params` refuses a config.json that another save wrote. Absent from older checkpoints.
CONFIG_SHA256 = "lcsm_jax.config_sha256"
_INTERNAL_METADATA = (BFLOAT16_AS_FLOAT32, CONFIG_SHA256)
# Saves and loads lock the checkpoint directory (flock: exclusive to save, shared to load)
# where the platform allows it; the config hash catches whatever the locks cannot.
_USE_LOCKS = True


@contextlib.contextmanager
def _directory_lock(path: pathlib.Path, *, exclusive: bool) -> Iterator[None]:
  """Holds an advisory `flock` on directory `path` (exclusive or shared) while active.

  Serialises `save_params` calls on one directory (so concurrent saves end in one save's
  complete pair of files) and keeps `load_params` from reading between a save's two renames.
  Where locks are unavailable (not POSIX, some network file systems) it does nothing.
  """
  fd = None
  if _USE_LOCKS and fcntl is not None:
    try:
      fd = os.open(path, os.O_RDONLY)
      fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:
      if fd is not None:
        os.close(fd)
      fd = None
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def _param_paths(params: Any) -> list[tuple[str, Any]]:
  """('/'-joined path, leaf) of every leaf of a parameter tree, as `check_params` names them."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = []
  for path, leaf in leaves:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    names.append(("/".join(str(k) for k in keys), leaf))
  return names


@jax.jit
def _all_finite_on_device(arrays: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) for x in arrays]


def non_finite_paths(params: Any) -> list[str]:
  """The paths ('/'-joined, e.g. 'params/ln_f/scale') of every floating-point array in
  `params` that holds a NaN or an infinity, in tree order; [] when all are finite.

  Cheap: for host arrays (NumPy, or JAX arrays on the CPU) one min and one max per array, NaN
  propagating, with no temporary except a float32 copy of bfloat16 (NumPy's reductions need a
  native float); arrays on an accelerator are reduced there by one jitted program, and only
  booleans are copied back. Non-floating leaves are skipped (`check_params` reports them).

  Raises:
    TypeError: a traced value (call it outside `jax.jit`, on concrete parameters).
  """
  entries = _param_paths(params)
  bad, on_device = [], []
  for name, leaf in entries:
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError(f"non_finite_paths needs concrete arrays, got a traced value at {name} "
                      "(inside jit/vmap); call it outside of JAX transformations.")
    if isinstance(leaf, jax.Array) and any(d.platform != "cpu" for d in leaf.devices()):
      if _is_float(leaf.dtype):
        on_device.append((name, leaf))
      continue
    array = np.asarray(leaf)
    if not _is_float(array.dtype) or array.size == 0:
      continue
    if array.dtype not in (np.float16, np.float32, np.float64, np.longdouble):
      array = array.astype(np.float32)  # bfloat16: NumPy's reductions need a native float
    if not (np.isfinite(array.min()) and np.isfinite(array.max())):  # NaN propagates
      bad.append(name)
  if on_device:
    finite = jax.device_get(_all_finite_on_device([leaf for _, leaf in on_device]))
    bad += [name for (name, _), ok in zip(on_device, finite) if not ok]
  order = {name: i for i, (name, _) in enumerate(entries)}
  return sorted(bad, key=order.__getitem__)


def check_finite(params: Any, *, name: str = "the parameters") -> None:
  """Raises `CheckpointError` naming every parameter (path and count) that holds NaN or inf.

  Non-finite weights make every logit NaN (and sampling then returns token 0 forever), so
  `load_params` and `save_params` refuse them; generation code can call this too. See
  `non_finite_paths` for the cost. `name` starts the message ('the parameters in ...').
  """
  bad = non_finite_paths(params)
  if not bad:
    return
  leaves = dict(_param_paths(params))
  lines = []
  for path in bad:
    values = np.asarray(jax.device_get(leaves[path])).astype(np.float32)
    lines.append(f"{path} holds non-finite values (NaN or inf): "
                 f"{values.size - np.count_nonzero(np.isfinite(values))} of {values.size}")
  raise CheckpointError(f"{name} hold non-finite values, which would make every output NaN:\n  "
                        + "\n  ".join(lines))


@functools.cache
def _safetensors_stores_bfloat16() -> bool:
  from safetensors.numpy import save
  try:
    save({"x": np.zeros((1,), jnp.bfloat16)})
    return True
  except Exception:
    return False


def _foreign_files(path: pathlib.Path) -> list[str]:
  """Files of a checkpoint that `save_params` did not write: HyenaDNA weights, or a
  config.json without params.safetensors beside it (save_params renames its weights into
  place before its config.json, so its own directories never look like that)."""
  found = [name for name in WEIGHT_FILES if (path / name).exists()]
  if (path / "config.json").exists() and not (path / OWN_WEIGHTS).exists():
    found.append("config.json")
  return found


def save_params(path: PathLike, config: HyenaConfig, params: Params,
                metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> None:
  """Writes `config.json` and `params.safetensors` into directory `path` (created if needed).

  The parameters are checked against `config` first (`check_params`) and must be finite
  (`check_finite`): nothing is written otherwise, so a diverged training run cannot replace
  its last good checkpoint. Both files are written to temporary names and then renamed, so an
  interrupted save leaves no half-written file; the SHA-256 of the config.json bytes is stored
  in the weights' metadata (`CONFIG_SHA256`), so `load_params` refuses a config.json written by
  another save. Concurrent saves to one directory are serialised by a lock where the platform
  has one. bfloat16 arrays are stored as bfloat16 where safetensors can, else as float32
  listed under the metadata key `BFLOAT16_AS_FLOAT32` (and cast back by `load_params`).

  Overwriting an earlier `save_params` directory is the normal use. A directory holding a
  checkpoint this function did not write (any of `WEIGHT_FILES`, or a config.json without
  params.safetensors: a HyenaDNA checkpoint) is refused unless `overwrite=True`, since its
  config.json would be replaced (its weight files are left, and would no longer match it).

  Raises:
    CheckpointError: parameters that do not fit `config`, or hold NaN or inf.
    TypeError: metadata that does not map str to str; a non-bool `overwrite`.
    ValueError: a reserved metadata key.
    FileExistsError: `path` holds a checkpoint not written by save_params (and not
      `overwrite`), or is a file.
  """
  from safetensors.numpy import save_file
  if not isinstance(overwrite, bool):
    raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
  check_params(config, params)
  check_finite(params, name="the parameters to save")
  metadata = dict(metadata or {})
  bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
  if bad:
    raise TypeError(f"safetensors metadata must map str to str; not so for {bad}.")
  reserved = sorted(set(metadata) & set(_INTERNAL_METADATA))
  if reserved:
    raise ValueError(f"the metadata keys {reserved} are reserved for lcsm_jax.")
  path = pathlib.Path(path)
  flat = traverse_util.flatten_dict(params, sep="/")
  arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flat.items()}
  widened = sorted(k for k, v in arrays.items() if v.dtype == jnp.bfloat16)
  if widened and not _safetensors_stores_bfloat16():
    arrays.update({k: arrays[k].astype(np.float32) for k in widened})
    metadata[BFLOAT16_AS_FLOAT32] = ",".join(widened)
  config_bytes = (json.dumps(config.to_hyenadna_dict(), indent=2) + "\n").encode("utf-8")
  metadata[CONFIG_SHA256] = hashlib.sha256(config_bytes).hexdigest()
  path.mkdir(parents=True, exist_ok=True)
  with _directory_lock(path, exclusive=True):
    foreign = _foreign_files(path)
    if foreign and not overwrite:
      raise FileExistsError(
          f"{path} holds a checkpoint not written by save_params ({', '.join(foreign)}); "
          "saving there would replace its config.json. Save to another directory, or pass "
          "overwrite=True to replace it.")
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
      weights_tmp, config_tmp = os.path.join(tmp, OWN_WEIGHTS), os.path.join(tmp, "config.json")
      save_file(arrays, weights_tmp, metadata=metadata)
      pathlib.Path(config_tmp).write_bytes(config_bytes)
      # safetensors creates its file with mode 0600; give it the mode an ordinary new file
      # gets (0666 less the umask, as config.json just got), so others can read the checkpoint.
      os.chmod(weights_tmp, stat.S_IMODE(os.stat(config_tmp).st_mode))
      # Weights first: a directory with a config.json but no params.safetensors is never one
      # of ours (see _foreign_files).
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
  for key in _INTERNAL_METADATA:
    metadata.pop(key, None)
  return metadata


def load_params(path: PathLike) -> tuple[HyenaConfig, Params]:
  """Reads a directory written by `save_params`, checking every array against the config.

  Returns:
    (config, params): the parameters as NumPy arrays in the dtypes they were saved with.

  Raises:
    CheckpointError: no params.safetensors or config.json, either unreadable or malformed, a
      config.json that does not belong to the weights (its SHA-256 differs from the one the
      save recorded: written by another save, or edited; checkpoints of lcsm_jax versions that
      recorded none are not checked), arrays that do not fit the config, or arrays holding
      NaN or inf (every offending parameter is named).
  """
  from safetensors import safe_open
  path = pathlib.Path(path)
  weights = path / OWN_WEIGHTS
  if not weights.is_file():
    raise CheckpointError(f"{path} has no {OWN_WEIGHTS}.")
  config_path = path / "config.json"
  with _directory_lock(path, exclusive=False):  # both files from one save, where locks work
    config_bytes = _read_config_bytes(config_path)
    config = _parse_config(config_path, config_bytes)
    try:
      with safe_open(str(weights), framework="np") as f:
        metadata = dict(f.metadata() or {})
        flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
      raise CheckpointError(f"{weights}: not a readable safetensors file ({e}).") from None
  recorded = metadata.get(CONFIG_SHA256)
  if recorded is not None and hashlib.sha256(config_bytes).hexdigest() != recorded:
    raise CheckpointError(
        f"{config_path} does not belong to these weights: {weights} records the SHA-256 of "
        f"the config.json saved with it ({recorded[:16]}...), and this config.json's differs "
        f"({hashlib.sha256(config_bytes).hexdigest()[:16]}...). The two files were written "
        "by different saves (two processes saving to this directory at once, or a config.json "
        "copied or edited by hand); save the checkpoint again.")
  for key in filter(None, metadata.get(BFLOAT16_AS_FLOAT32, "").split(",")):
    if key not in flat:
      raise CheckpointError(f"{weights}: metadata lists {key!r} as bfloat16, but there is no "
                            "such array.")
    flat[key] = flat[key].astype(jnp.bfloat16)
  params = traverse_util.unflatten_dict(flat, sep="/")
  check_params(config, params)
  check_finite(params, name=f"the parameters in {weights}")
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
