"""Checks of user inputs with clear errors, shared by the public entry points.

Every function either returns a normalised value or raises `TypeError` (wrong kind of value)
or `ValueError` (right kind, wrong value; `CheckpointError` for non-finite parameters) with a
message that names the argument, what was expected and what was given. The checks of a
parameter tree against a config are in `lcsm_jax.models.hyena.params`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax.errors import CheckpointError
from lcsm_jax.models.hyena.config import HyenaConfig

# Parameter / activation dtypes the model supports (float64 only under jax_enable_x64).
SUPPORTED_DTYPES = ("float32", "bfloat16", "float64")


def check_config(config: Any, name: str = "config") -> HyenaConfig:
  """`config` must be a `HyenaConfig`."""
  if not isinstance(config, HyenaConfig):
    raise TypeError(f"{name} must be a lcsm_jax HyenaConfig, got {type(config).__name__}.")
  return config


def check_token_ids(ids: Any, config: HyenaConfig, *, name: str = "input_ids",
                    allow_empty: bool = False, max_length: int | None = None) -> np.ndarray:
  """Checks a batch of token ids and returns it as a C-contiguous int32 NumPy array.

  Args:
    ids: `(batch, length)` integer ids: a NumPy or JAX array, or nested lists.
    config: the model's configuration (its `vocab_size` and `l_max`).
    name: the argument's name, used in the messages.
    allow_empty: accept `length == 0`.
    max_length: the longest accepted length instead of `config.l_max` (for instance l_max
      minus the positions still to be generated).

  Raises:
    TypeError: `ids` is not an array of integers (floats and bools are refused), or is traced.
    ValueError: wrong rank, empty, too long, or an id outside `[0, vocab_size)`.
  """
  check_config(config)
  if ids is None:
    raise TypeError(f"{name} must be a (batch, length) array of token ids, got None.")
  if isinstance(ids, jax.core.Tracer):
    raise TypeError(f"{name} must be a concrete array, got a traced value (inside jit/vmap); "
                    "call this function outside of JAX transformations.")
  from_sequence = not isinstance(ids, (np.ndarray, np.generic, jax.Array))
  try:
    arr = np.asarray(jax.device_get(ids))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name} must be a rectangular (batch, length) array of token ids; it "
                     f"could not be read as one ({e}).") from None
  if from_sequence and arr.size == 0 and arr.dtype == np.float64:
    arr = arr.astype(np.int32)  # `[[]]` has no element to give NumPy an integer dtype
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D (batch, length), got shape {arr.shape}"
                     + (" (add a batch axis: ids[None])" if arr.ndim == 1 else "") + ".")
  if arr.dtype == np.bool_:
    raise TypeError(f"{name} must hold integer token ids, got booleans.")
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}"
                    + (" (cast with .astype(np.int32) if the values are whole numbers)"
                       if jnp.issubdtype(arr.dtype, jnp.floating) else "") + ".")
  batch, length = arr.shape
  if batch == 0:
    raise ValueError(f"{name} has batch size 0; it needs at least one row.")
  if length == 0 and not allow_empty:
    raise ValueError(f"{name} is empty (length 0); it needs at least one token.")
  if max_length is not None:
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
        or max_length < 0:
      raise ValueError(f"max_length must be a non-negative integer, got {max_length!r}.")
    if length > max_length:
      raise ValueError(f"{name} has length {length}, more than the allowed maximum "
                       f"max_length = {int(max_length)} (the model's l_max is {config.l_max}).")
  elif length > config.l_max:
    raise ValueError(f"{name} has length {length}, more than the model's maximum length "
                     f"l_max = {config.l_max}.")
  bad = (arr < 0) | (arr >= config.vocab_size)
  if bad.any():
    row, col = (int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    raise ValueError(
        f"{name}[{row}, {col}] = {arr[row, col]} is outside the vocabulary [0, "
        f"{config.vocab_size})" + (f" ({count} ids are out of range)" if count > 1 else "") + ".")
  return np.ascontiguousarray(arr, dtype=np.int32)


def check_positive_int(value: Any, name: str) -> int:
  """`value` as an int >= 1 (bools and floats refused with a ValueError naming `name`)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
  """A supported floating dtype: float32, bfloat16, or float64 when `jax_enable_x64` is on.

  Accepts anything `jnp.dtype` understands (`jnp.float32`, `'bfloat16'`, `np.dtype(...)`) and
  returns the canonical `np.dtype`.
  """
  if dtype is None:
    raise TypeError(f"{name} must be one of float32, bfloat16 (or float64 with x64), got None.")
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"{name}: {dtype!r} is not a dtype; use jnp.float32 or jnp.bfloat16.") from None
  if resolved.name not in SUPPORTED_DTYPES:
    raise ValueError(f"{name} {resolved.name} is not supported; use float32 or bfloat16 "
                     "(or float64 with jax_enable_x64).")
  if resolved == np.float64 and not jax.config.jax_enable_x64:
    raise ValueError(f"{name} float64 needs 64-bit JAX: enable it with "
                     "jax.config.update('jax_enable_x64', True) or `with jax.enable_x64(True):`, "
                     "or use float32.")
  return resolved


STEP_WEIGHTS = ("float32", "bfloat16")


def check_step_weights(value: Any, name: str = "step_weights") -> str:
  """The dtype of a language model's step weights, as its name: 'float32' or 'bfloat16'.

  Accepts the names and anything `jnp.dtype` understands (`jnp.bfloat16`, `np.float32`).
  Raises TypeError for something that is not a dtype, ValueError for another dtype.
  """
  if isinstance(value, bool) or value is None:
    raise TypeError(f"{name} must be 'float32' or 'bfloat16', got {value!r}.")
  try:
    resolved = jnp.dtype(value).name
  except TypeError:
    raise TypeError(f"{name} must be 'float32' or 'bfloat16', got {value!r} (not a "
                    "dtype).") from None
  if resolved not in STEP_WEIGHTS:
    raise ValueError(f"{name} must be 'float32' or 'bfloat16' (weights of the one-position "
                     f"step; accumulation stays float32), got {resolved}.")
  return resolved


def is_float(dtype: Any) -> bool:
  """Whether `dtype` is a floating-point dtype (unlike NumPy's test, also true for bfloat16)."""
  return jnp.issubdtype(dtype, jnp.floating)


def name_problems(want, got, noun: str) -> list[str]:
  """Messages naming every key of `want` missing from `got` and every unexpected key."""
  problems = []
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if missing:
    problems.append(f"missing {noun}: " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected {noun}: " + ", ".join(unexpected))
  return problems


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


def _host_finite(array: np.ndarray) -> bool:
  """False when a floating-point host array holds NaN or inf (one min and one max)."""
  if not is_float(array.dtype) or array.size == 0:
    return True
  if array.dtype not in (np.float16, np.float32, np.float64, np.longdouble):
    array = array.astype(np.float32)  # bfloat16: NumPy's reductions need a native float
  return bool(np.isfinite(array.min()) and np.isfinite(array.max()))  # NaN propagates


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
      if is_float(leaf.dtype):
        on_device.append((name, leaf))
      continue
    if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
      # on a host-device mesh: each shard this process holds, never the gathered array
      if any(not _host_finite(np.asarray(shard.data)) for shard in leaf.addressable_shards):
        bad.append(name)
      continue
    if not _host_finite(np.asarray(leaf)):
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
