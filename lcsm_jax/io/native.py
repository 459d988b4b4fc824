"""The project's own checkpoint format: a directory holding `config.json` (the HyenaDNA config
format) and `params.safetensors` (the parameters, flattened with '/'-joined keys).

`save_params` checks the parameters against the config and for NaN / inf before writing
anything, writes both files under temporary names and renames them into place, records the
SHA-256 of the config.json bytes in the weights' metadata, and locks the directory where the
platform allows; `load_params` checks all of that back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import stat
import tempfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcsm_jax import validation
from lcsm_jax.errors import CheckpointError
from lcsm_jax.io import distilled as distilled_io
from lcsm_jax.io import hyenadna
from lcsm_jax.models.hyena import params as params_lib
from lcsm_jax.models.hyena.config import HyenaConfig

try:
  import fcntl
except ImportError:  # not POSIX: saves and loads run without directory locks
  fcntl = None

PathLike = str | os.PathLike[str]
Params = dict[str, Any]

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
  found = [name for name in hyenadna.WEIGHT_FILES if (path / name).exists()]
  if (path / "config.json").exists() and not (path / OWN_WEIGHTS).exists():
    found.append("config.json")
  return found


def save_params(path: PathLike, config: HyenaConfig, params: Params,
                metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                distilled: Any = None) -> None:
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
  checkpoint this function did not write (any of `hyenadna.WEIGHT_FILES`, or a config.json
  without params.safetensors: a HyenaDNA checkpoint) is refused unless `overwrite=True`, since
  its config.json would be replaced (its weight files are left, and would no longer match it).

  With `distilled` (from `lcsm_jax.distill`), its filters are saved too, as the distilled
  section `distilled.safetensors` (`io.distilled`), bound to these weights and this config by
  their SHA-256; without it, a distilled section left by an earlier save is removed (it would
  describe other weights). `load_distilled` reads it back.

  Raises:
    CheckpointError: parameters that do not fit `config`, or hold NaN or inf; distilled
      filters of another shape than the model's streams and channels.
    TypeError: metadata that does not map str to str; a non-bool `overwrite`.
    ValueError: a reserved metadata key.
    FileExistsError: `path` holds a checkpoint not written by save_params (and not
      `overwrite`), or is a file.
  """
  from safetensors.numpy import save_file
  if not isinstance(overwrite, bool):
    raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
  params_lib.check_params(config, params)
  validation.check_finite(params, name="the parameters to save")
  if distilled is not None:
    _check_distilled(config, distilled)
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
      distilled_tmp = os.path.join(tmp, distilled_io.DISTILLED_FILE)
      if distilled is not None:
        distilled_io.write(pathlib.Path(distilled_tmp), distilled,
                           config_sha256=metadata[CONFIG_SHA256],
                           params_sha256=distilled_io.file_sha256(pathlib.Path(weights_tmp)))
        os.chmod(distilled_tmp, stat.S_IMODE(os.stat(config_tmp).st_mode))
      # Weights first: a directory with a config.json but no params.safetensors is never one
      # of ours (see _foreign_files).
      os.replace(weights_tmp, path / OWN_WEIGHTS)
      os.replace(config_tmp, path / "config.json")
      if distilled is not None:
        os.replace(distilled_tmp, path / distilled_io.DISTILLED_FILE)
      else:
        (path / distilled_io.DISTILLED_FILE).unlink(missing_ok=True)


def _check_distilled(config: HyenaConfig, distilled: Any) -> None:
  filters = getattr(distilled, "filters", None)
  if filters is None or getattr(distilled, "skip", None) is None:
    raise TypeError(f"distilled must be the result of lcsm_jax.distill, got "
                    f"{type(distilled).__name__}.")
  want = (config.num_streams, config.d_model)
  if tuple(filters.poles.shape[:2]) != want or tuple(filters.h0.shape) != want:
    raise CheckpointError(f"the distilled filters have poles {tuple(filters.poles.shape)} and h0 "
                          f"{tuple(filters.h0.shape)}; this config needs (S, D) = {want} "
                          "(distilled from another model?).")


def has_distilled(path: PathLike) -> bool:
  """Whether `path` holds a distilled section."""
  return (pathlib.Path(path) / distilled_io.DISTILLED_FILE).is_file()


def load_distilled(path: PathLike):
  """The distilled filters saved with the checkpoint in `path` (`save_params(...,
  distilled=...)`), as a `lcsm_jax.distillation.Distilled`, or None when it has none.

  Raises:
    CheckpointError: a distilled section that does not fit the config (named), or that was
      fitted from other weights or another config.json (their SHA-256 differ).
  """
  path = pathlib.Path(path)
  if not has_distilled(path):
    return None
  with _directory_lock(path, exclusive=False):
    config_bytes = hyenadna.read_config_bytes(path / "config.json")
    config = hyenadna.parse_config(path / "config.json", config_bytes)
    if not (path / OWN_WEIGHTS).is_file():
      raise CheckpointError(f"{path} has a distilled section but no {OWN_WEIGHTS}.")
    return distilled_io.read(path, num_streams=config.num_streams, width=config.d_model,
                             config_sha256=hashlib.sha256(config_bytes).hexdigest(),
                             params_sha256=distilled_io.file_sha256(path / OWN_WEIGHTS))


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


def load_params(path: PathLike, mesh: jax.sharding.Mesh | None = None,
                mesh_axes: tuple[str | None, str | None] = ("data", "model")
                ) -> tuple[HyenaConfig, Params]:
  """Reads a directory written by `save_params`, checking every array against the config.

  With a `mesh`, every array is built straight into its shards (`jax.make_array_from_callback`
  with the `NamedSharding` that the model's `param_partition` gives it through
  `decoding.sharding`, axes named by mesh_axes = (data, model)): each device's callback reads
  only that device's slice from the safetensors file, so no process holds the whole model (a
  replicated parameter is read whole by each device that holds it). Shapes are checked against
  the config from the file's header before anything is read; the finite check runs on every
  slice read. `Decoder(params, config, mesh=mesh)` takes such parameters without moving them.

  Returns:
    (config, params): without a mesh, NumPy arrays in the dtypes they were saved with; with
    one, `jax.Array`s sharded over it.

  Raises:
    CheckpointError: no params.safetensors or config.json, either unreadable or malformed, a
      config.json that does not belong to the weights (its SHA-256 differs from the one the
      save recorded: written by another save, or edited; checkpoints of lcsm_jax versions that
      recorded none are not checked), arrays that do not fit the config, or arrays holding
      NaN or inf (every offending parameter is named).
    ValueError: a mesh whose axes are not mesh_axes, or whose model axis does not divide the
      model's width.
  """
  from safetensors import safe_open
  from lcsm_jax.decoding import sharding as sharding_lib
  path = pathlib.Path(path)
  weights = path / OWN_WEIGHTS
  if not weights.is_file():
    raise CheckpointError(f"{path} has no {OWN_WEIGHTS}.")
  config_path = path / "config.json"
  sharding = sharding_lib.create(mesh, mesh_axes)
  with _directory_lock(path, exclusive=False):  # both files from one save, where locks work
    config_bytes = hyenadna.read_config_bytes(config_path)
    config = hyenadna.parse_config(config_path, config_bytes)
    if sharding is not None:
      sharding.check(width=config.d_model)
    try:
      with safe_open(str(weights), framework="np") as f:
        metadata = dict(f.metadata() or {})
        _check_config_hash(metadata, config_bytes, config_path, weights)
        widened = _widened(metadata, f.keys(), weights)
        if sharding is None:
          flat = {k: f.get_tensor(k) for k in f.keys()}
        else:
          flat = _read_sharded(f, sharding, config, widened, weights)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{weights}: not a readable safetensors file ({e}).") from None
  if sharding is None:
    for key in widened:
      flat[key] = flat[key].astype(jnp.bfloat16)
  params = traverse_util.unflatten_dict(flat, sep="/")
  params_lib.check_params(config, params)
  if sharding is None:  # on a mesh, every slice was checked as it was read
    validation.check_finite(params, name=f"the parameters in {weights}")
  return config, params


def _check_config_hash(metadata: Mapping[str, str], config_bytes: bytes,
                       config_path: pathlib.Path, weights: pathlib.Path) -> None:
  recorded = metadata.get(CONFIG_SHA256)
  if recorded is not None and hashlib.sha256(config_bytes).hexdigest() != recorded:
    raise CheckpointError(
        f"{config_path} does not belong to these weights: {weights} records the SHA-256 of "
        f"the config.json saved with it ({recorded[:16]}...), and this config.json's differs "
        f"({hashlib.sha256(config_bytes).hexdigest()[:16]}...). The two files were written "
        "by different saves (two processes saving to this directory at once, or a config.json "
        "copied or edited by hand); save the checkpoint again.")


def _widened(metadata: Mapping[str, str], keys: Any, weights: pathlib.Path) -> list[str]:
  """The arrays stored as float32 in place of bfloat16 (checked to exist)."""
  keys = set(keys)
  widened = list(filter(None, metadata.get(BFLOAT16_AS_FLOAT32, "").split(",")))
  for key in widened:
    if key not in keys:
      raise CheckpointError(f"{weights}: metadata lists {key!r} as bfloat16, but there is no "
                            "such array.")
  return widened


def _read_sharded(f: Any, sharding: Any, config: HyenaConfig, widened: list[str],
                  weights: pathlib.Path) -> dict[str, jax.Array]:
  """Every array of the open safetensors file `f` built on the mesh of `sharding`, each device
  reading only its slice (`get_slice(name)[index]`). The header's shapes are checked against
  `config` first (nothing is read if they do not fit); every slice is checked for NaN / inf."""
  from lcsm_jax import models
  from lcsm_jax.decoding import sharding as sharding_lib
  abstract = {}
  for key in f.keys():
    piece = f.get_slice(key)
    dtype = jnp.bfloat16 if key in widened else _NUMPY_DTYPES.get(piece.get_dtype())
    if dtype is None:
      raise CheckpointError(f"{weights}: {key} has dtype {piece.get_dtype()}, expected a "
                            "floating-point array.")
    abstract[key] = jax.ShapeDtypeStruct(tuple(piece.get_shape()), dtype)
  tree = traverse_util.unflatten_dict(abstract, sep="/")
  params_lib.check_params(config, tree)
  placements = traverse_util.flatten_dict(sharding_lib.shardings(
      sharding, tree, models.online_model(config).param_partition(tree)), sep="/")
  non_finite = set()

  def reader(key: str, dtype: Any) -> Any:
    def read(index: tuple[slice, ...]) -> np.ndarray:
      piece = f.get_slice(key)
      block = piece[index] if index else f.get_tensor(key)
      block = np.asarray(block).astype(dtype, copy=False)
      if block.size and not np.isfinite(block.astype(np.float32, copy=False)).all():
        non_finite.add(key)
      return block
    return read

  flat = {key: jax.make_array_from_callback(x.shape, placements[key], reader(key, x.dtype))
          for key, x in abstract.items()}
  if non_finite:
    raise CheckpointError(f"the parameters in {weights} hold non-finite values, which would "
                          "make every output NaN: " + ", ".join(sorted(non_finite)))
  return flat


# safetensors' dtype names (PySafeSlice.get_dtype) of the floating-point arrays it reads.
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64,
                 "BF16": jnp.bfloat16}
