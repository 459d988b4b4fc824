"""Choosing the next token from logits: greedy, or Gumbel-max sampling with temperature, top-k
and top-p (nucleus) filtering. Deterministic for a given key and step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling choices (they shape the compiled program).

  Attributes:
    vocab_size: only the first `vocab_size` logits are real tokens.
    greedy: argmax, no noise (temperature 0).
    top_k: keep the k largest logits (None: all).
    use_top_p: apply nucleus filtering with the dynamic `top_p` value.
  """

  vocab_size: int
  greedy: bool = False
  top_k: int | None = None
  use_top_p: bool = False


def filter_logits(logits: Array, config: SamplingConfig, top_p: Array | float) -> Array:
  """Masks logits (B, V) outside the top-k / top-p sets with -inf."""
  if config.top_k is not None and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.use_top_p:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def gumbel_noise(key: Array, step: Array | int, shape: tuple[int, ...]) -> Array:
  """The noise of generation step `step`: independent of the strategy and of earlier steps."""
  return jax.random.gumbel(jax.random.fold_in(key, step), shape, jnp.float32)


def choose(logits: Array, config: SamplingConfig, temperature: Array | float,
           top_p: Array | float, noise: Array | None) -> Array:
  """Next tokens (B,) int32 from logits (B, >= vocab_size): argmax(filtered logits / T + noise)."""
  logits = logits[..., :config.vocab_size].astype(jnp.float32)
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scores = filter_logits(logits / temperature, config, top_p)
  return jnp.argmax(scores + noise, axis=-1).astype(jnp.int32)
