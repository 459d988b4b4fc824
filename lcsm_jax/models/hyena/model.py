"""The Hyena language model: embedding, stacked Hyena blocks, final LayerNorm, tied head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.modules import HyenaBlock, MixerCache

Array = jax.Array
DType = Any


class HyenaStack(nn.Module):
  """`n_layer` Hyena blocks whose parameters are stacked on a leading layer axis.

  The layers are stacked by `nn.scan`: one layer is traced (so compile time does not grow with
  depth), and every parameter under `blocks` gets a leading layer axis of size `n_layer`.
  """

  config: HyenaConfig
  long_conv: str = "fft"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, collect_cache: bool = False, taps: Array | None = None
               ) -> tuple[Array, MixerCache | None]:
    """x (B, L, D); taps: None, or every layer's long filters (n_layer, >= L, N - 1, D) to use
    instead of the implicit filters'."""
    blocks = nn.scan(
        HyenaBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.config.n_layer,
        in_axes=0,
    )(self.config, self.long_conv, collect_cache, self.dtype, self.param_dtype, name="blocks")
    return blocks(x, taps)


class HyenaLM(nn.Module):
  """Hyena (HyenaDNA) language model.

  Attributes:
    config: the architecture.
    long_conv: 'fft' (default) or 'direct' (the O(L^2) reference) for the long convolutions,
      or a function (u (B, L, D), h (>= L, D)) -> (B, L, D) computing the same convolution
      (e.g. on each device's shards).
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

  def __call__(self, input_ids: Array, collect_cache: bool = False,
               taps: Array | None = None):
    """Parallel forward.

    Args:
      input_ids: (B, L) integer token ids, L <= l_max.
      collect_cache: also return what generation needs to continue after these tokens.
      taps: None, or long filters (>= L, S, D) for the S = n_layer x (order - 1) convolutions
        (layer-major, as the decoding engine orders them) to use instead of the implicit
        filters' (e.g. distilled ones; the skip terms stay the model's).
    Returns:
      logits (B, L, padded_vocab) in float32, and with `collect_cache` a `MixerCache` whose
      arrays carry a leading layer axis.
    """
    if taps is not None:
      cfg = self.config
      taps = taps[:input_ids.shape[-1]]  # before the layer-major copy: taps may be far longer
      taps = jnp.moveaxis(taps.reshape(taps.shape[0], cfg.n_layer, cfg.num_convolutions,
                                       cfg.d_model), 1, 0)
    x, cache = self.stack(self.embed(input_ids), collect_cache, taps)
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
