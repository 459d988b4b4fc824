"""The parameters of `HyenaLM`: their specification (paths, shapes, dtypes), random
initialisation, dtype casting, and the checks of a parameter tree against a config."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcsm_jax import validation
from lcsm_jax.errors import CheckpointError
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM

Array = jax.Array
DType = Any
Params = dict[str, Any]


@functools.lru_cache(maxsize=64)
def param_spec(config: HyenaConfig, dtype: DType = jnp.float32) -> Params:
  """`{'params': ...}` of `jax.ShapeDtypeStruct`s: every parameter of
  `HyenaLM(config, param_dtype=dtype)` with its shape and dtype (`dtype`, except the filters'
  positional tables `z` and `t`, which the modules keep in float32). Computed by
  `jax.eval_shape` (nothing is allocated) and cached; do not modify the returned tree."""
  return jax.eval_shape(
      lambda: HyenaLM(config, param_dtype=dtype).init(jax.random.key(0),
                                                      jnp.zeros((1, 1), jnp.int32)))


def cast_params(config: HyenaConfig, params: Params, dtype: DType) -> Params:
  """`{'params': ...}` cast to the dtypes of `HyenaLM(config, param_dtype=dtype)`.

  Every parameter becomes `dtype` except the filters' positional tables `z` and `t`, which
  stay float32 (at least) as the modules create them: in bfloat16 the time grid `t` would
  repeat values every few positions.
  """
  dtype = validation.check_dtype(dtype)
  check_params_match(config, params)
  native = param_spec(config, dtype)["params"]
  return {"params": jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype),
                                 params["params"], native)}


def init_params(config: HyenaConfig, key: Array, *, dtype: DType = jnp.float32) -> Params:
  """Randomly initialised parameters `{'params': ...}` for `HyenaLM(config)`.

  The values are drawn by the modules' own initialisers (`HyenaLM(config).init`, in float32, so
  every dtype gets the same values up to rounding) and then cast to `dtype` as in
  `cast_params` (positional tables stay float32). The implicit filters are non-trivial from
  the start (a Sin-MLP over the positional table, times the decay window), so random models
  are meaningful for benchmarks and tests.

  Args:
    config: the architecture.
    key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`).
    dtype: parameter dtype: float32 (default), bfloat16, or float64 under `jax_enable_x64`.
  """
  validation.check_config(config)
  dtype = validation.check_dtype(dtype)
  native = param_spec(config, dtype)["params"]
  if isinstance(key, jax.core.Tracer) or isinstance(jnp.zeros(()), jax.core.Tracer):
    variables = _init(config, key)  # under a JAX transformation (jit, eval_shape, vmap)
  else:
    variables = _jitted_init()(config, key)
  return {"params": jax.tree.map(lambda x, s: x.astype(s.dtype), variables["params"], native)}


def _init(config: HyenaConfig, key: Array) -> Params:
  return HyenaLM(config).init(key, jnp.zeros((1, 1), jnp.int32))


@functools.cache
def _jitted_init():
  """`_init` jitted once per process (and compiled once per config and key type).

  Initialisation runs once, but XLA:CPU takes seconds to optimise its many random-number
  generators; unoptimised code (`xla_backend_optimization_level=0`) compiles ~3x faster. The
  values then differ from an optimised or eager `init` in the last bit of some entries, which
  no use of random parameters can depend on.
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(_init, static_argnums=0, compiler_options=options)


def check_params(config: HyenaConfig, params: Params) -> None:
  """Raises `CheckpointError` naming every parameter whose path, shape or dtype (floating
  point) does not fit `config`."""
  want = {k: tuple(v.shape)
          for k, v in traverse_util.flatten_dict(param_spec(config), sep="/").items()}
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
  problems = validation.name_problems(want, got, "parameters")
  for key in sorted(set(want) & set(got)):
    shape = tuple(np.shape(got[key]))
    dtype = getattr(got[key], "dtype", None)
    if dtype is None:
      dtype = np.asarray(got[key]).dtype
    if shape != want[key]:
      problems.append(f"{key} has shape {shape}, the config expects {want[key]}")
    elif not validation.is_float(dtype):
      problems.append(f"{key} has dtype {dtype}, expected a floating-point array")
  if problems:
    raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems))


def check_params_match(config: HyenaConfig, params: Any) -> None:
  """`params` must be `{'params': ...}` for `HyenaLM(config)`: every path and shape is checked
  by `check_params`, which raises `CheckpointError` (a `ValueError`) naming each missing,
  unexpected or mis-shaped parameter."""
  validation.check_config(config)
  if not isinstance(params, dict) and not hasattr(params, "keys"):
    raise TypeError(f"params must be a dict {{'params': ...}}, got {type(params).__name__}.")
  check_params(config, params)
