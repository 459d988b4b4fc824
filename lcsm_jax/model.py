"""The Hyena language model: embedding, stacked Hyena blocks, final LayerNorm, tied head."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcsm_jax import validation
from lcsm_jax.config import HyenaConfig
from lcsm_jax.modules import HyenaBlock, MixerCache

Array = jax.Array
DType = Any


class HyenaStack(nn.Module):
  """`n_layer` Hyena blocks whose parameters are stacked on a leading layer axis.

  The stacking (through `nn.scan`) lets the generation engine `vmap` over layers.
  """

  config: HyenaConfig
  long_conv: str = "fft"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, collect_cache: bool = False) -> tuple[Array, MixerCache | None]:
    blocks = nn.scan(
        HyenaBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.config.n_layer,
        in_axes=(),
    )(self.config, self.long_conv, collect_cache, self.dtype, self.param_dtype, name="blocks")
    return blocks(x)


class HyenaLM(nn.Module):
  """Hyena (HyenaDNA) language model.

  Attributes:
    config: the architecture.
    long_conv: 'fft' (default) or 'direct' (the O(L^2) reference) for the long convolutions.
    dtype: activation dtype (float32 or bfloat16); long convolutions always run in float32.
    param_dtype: parameter dtype.
  """

  config: HyenaConfig
  long_conv: str = "fft"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    cfg = self.config
    self.embedder = nn.Embed(cfg.padded_vocab_size, cfg.d_model,
                             embedding_init=nn.initializers.normal(0.02),
                             dtype=self.dtype, param_dtype=self.param_dtype)
    self.stack = HyenaStack(cfg, self.long_conv, self.dtype, self.param_dtype)
    self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, use_fast_variance=False,
                             dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, input_ids: Array, collect_cache: bool = False):
    """Parallel forward.

    Args:
      input_ids: (B, L) integer token ids, L <= l_max.
      collect_cache: also return what generation needs to continue after these tokens.
    Returns:
      logits (B, L, padded_vocab) in float32, and with `collect_cache` a `MixerCache` whose
      arrays carry a leading layer axis.
    """
    x, cache = self.stack(self.embed(input_ids), collect_cache)
    logits = self.head(x)
    return (logits, cache) if collect_cache else logits

  def embed(self, input_ids: Array) -> Array:
    """Token ids (...) -> residual stream (..., D)."""
    x = self.embedder(input_ids)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if self.config.residual_in_fp32 else x

  def head(self, x: Array) -> Array:
    """Residual stream (..., D) -> logits (..., padded_vocab), tied to the embedding."""
    h = self.ln_f(x)
    logits = self.embedder.attend(h)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


@functools.lru_cache(maxsize=64)
def _native_dtypes(config: HyenaConfig, dtype: DType) -> dict[str, Any]:
  """Each parameter's dtype in `HyenaLM(config, param_dtype=dtype)`: `dtype`, except the
  filters' positional tables (`z`, `t`), which the module keeps in float32."""
  shapes = jax.eval_shape(
      lambda: HyenaLM(config, param_dtype=dtype).init(jax.random.key(0),
                                                      jnp.zeros((1, 1), jnp.int32)))
  return shapes["params"]


def cast_params(config: HyenaConfig, params: dict[str, Any], dtype: DType) -> dict[str, Any]:
  """`{'params': ...}` cast to the dtypes of `HyenaLM(config, param_dtype=dtype)`.

  Every parameter becomes `dtype` except the filters' positional tables `z` and `t`, which
  stay float32 (at least) as the modules create them: in bfloat16 the time grid `t` would
  repeat values every few positions.
  """
  dtype = validation.check_dtype(dtype)
  validation.check_params_match(config, params)
  native = _native_dtypes(config, dtype)
  return {"params": jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype),
                                 params["params"], native)}


def init_params(config: HyenaConfig, key: Array, *, dtype: DType = jnp.float32
                ) -> dict[str, Any]:
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
  native = _native_dtypes(config, dtype)
  if isinstance(key, jax.core.Tracer) or isinstance(jnp.zeros(()), jax.core.Tracer):
    variables = _init(config, key)  # under a JAX transformation (jit, eval_shape, vmap)
  else:
    variables = _jitted_init()(config, key)
  return {"params": jax.tree.map(lambda x, s: x.astype(s.dtype), variables["params"], native)}


def _init(config: HyenaConfig, key: Array) -> dict[str, Any]:
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
