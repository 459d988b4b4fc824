"""Choosing the next token from logits: greedy, or Gumbel-max sampling with temperature, top-k
and top-p (nucleus) filtering.

Noise: row b of a batch draws the noise of sampling step j from `fold_in(row_key[b], j)`, with
`row_key[b] = fold_in(key, b)` unless the caller gives one key per row. A row's tokens therefore
depend on its own prompt, key (or index) and step only: not on the batch size, the other rows,
or the strategy.

Temperature T > 0 samples from softmax(logits / T), computed as argmax(logits + T * noise)
(the same distribution, without the overflow of logits / T for tiny T). Temperatures are
clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]: to float32 precision the ends are the limits
T -> 0 (greedy; exactly tied logits broken by the noise) and T -> inf (uniform among the tokens
that top-k / top-p keep).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30


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


def check_temperature(temperature) -> float:
  """A Python float in {0} U [MIN_TEMPERATURE, MAX_TEMPERATURE] from a number >= 0.

  Accepts Python and NumPy numbers and concrete 0-d arrays (e.g. `jnp.float32(0.5)`).

  Raises:
    TypeError: not a real number (or a traced value).
    ValueError: negative or NaN.
  """
  if isinstance(temperature, jax.core.Tracer):
    raise TypeError("temperature must be a concrete number, got a traced value; pass it "
                    "from outside jit.")
  if isinstance(temperature, (np.ndarray, jax.Array)) and np.ndim(temperature) == 0:
    temperature = np.asarray(temperature).item()
  if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
    raise TypeError(f"temperature must be a real number >= 0, got {temperature!r}.")
  value = float(temperature)
  if math.isnan(value) or value < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}.")
  if value == 0:
    return 0.0
  return min(max(value, MIN_TEMPERATURE), MAX_TEMPERATURE)


def filter_logits(logits: Array, config: SamplingConfig, top_p: Array | float,
                  temperature: Array | float = 1.0) -> Array:
  """Masks logits (B, V) outside the top-k / top-p sets with -inf.

  top-p measures mass under softmax(logits / temperature), computed from differences to the
  row's maximum (<= 0), so that no temperature in the clamped range overflows.
  """
  if config.top_k is not None and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.use_top_p:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax((sorted_logits - sorted_logits[..., :1]) / temperature, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def row_keys(key: Array, batch: int) -> Array:
  """One key per row, (batch,): fold_in(key, b)."""
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def step_noise(keys: Array, step: Array | int, vocab_size: int) -> Array:
  """Gumbel noise (B, vocab_size) of sampling step `step` for rows with keys (B,): row b's
  noise depends only on keys[b] and the step."""
  return jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), (vocab_size,),
                                              jnp.float32))(keys)


def choose(logits: Array, config: SamplingConfig, temperature: Array | float,
           top_p: Array | float, noise: Array | None) -> Array:
  """Next tokens (B,) int32 from logits (B, >= vocab_size): argmax over the filtered logits
  of logits + temperature * noise (= argmax(logits / T + noise): a sample of softmax(logits / T))."""
  logits = logits[..., :config.vocab_size].astype(jnp.float32)
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scores = filter_logits(logits, config, top_p, temperature)
  return jnp.argmax(scores + temperature * noise, axis=-1).astype(jnp.int32)
