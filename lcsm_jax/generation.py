"""Public generation API for Hyena language models: `generate` (sampling) and
`teacher_forced_logits` (scoring), with the exact strategies 'flash' (tiled, quasi-linear),
'lazy', 'eager' and 'recompute'; all give the same tokens.

Both run one parallel forward over the prompt (prefill), then one position at a time. The
compiled programs are cached by `jax.jit` on the static choices (shapes, strategy, sampling
mode); filter tables are computed once per call by a separate compiled function, outside the
token loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcsm_jax import engine
from lcsm_jax import sampling
from lcsm_jax import validation
from lcsm_jax.config import HyenaConfig
from lcsm_jax.engine import EngineOptions
from lcsm_jax.online import HyenaOnline

Array = jax.Array
Params = Any
STRATEGIES = engine.STRATEGIES


class GenerationOutput(NamedTuple):
  """tokens (B, N) int32 (after an end token, `eos_id` repeated); lengths (B,) tokens up to and
  including the first end token; logits (B, N, vocab_size) float32 per step, if requested."""

  tokens: Array
  lengths: Array
  logits: Array | None


class _Sampler(NamedTuple):
  """Dynamic sampling inputs: noise (B, N, V) or None, key, temperature, top_p, eos_id or None."""
  noise: Array | None
  key: Array
  temperature: Array
  top_p: Array
  eos_id: Array | None


class _GenerationIO(NamedTuple):
  tokens: Array  # (B, N)
  logits: Array  # (B, N, V), or (B, 0, V) when not returned
  done: Array    # (B,) bool: the row has emitted its end token


def _next_token(cfg: sampling.SamplingConfig, s: _Sampler, logits: Array, index, done: Array):
  """Token `index` of every row from its logits; rows that ended repeat the end token."""
  if cfg.greedy:
    noise = None
  elif s.noise is not None:
    noise = lax.dynamic_index_in_dim(s.noise, index, axis=1, keepdims=False)
  else:
    noise = sampling.gumbel_noise(s.key, index, logits.shape[:1] + (cfg.vocab_size,))
  token = sampling.choose(logits, cfg, s.temperature, s.top_p, noise)
  if s.eos_id is None:
    return token, done
  token = jnp.where(done, s.eos_id, token)
  return token, done | (token == s.eos_id)


@functools.partial(jax.jit, static_argnames=(
    "online", "mixer", "sampling_config", "num_tokens", "return_logits", "on_token"))
def _generate(params, tables, constants, prompt, sampler, *, online, mixer, sampling_config,
              num_tokens, return_logits, on_token=None):
  batch = prompt.shape[0]
  vocab = sampling_config.vocab_size
  prefill = online.prefill(params, prompt)
  last_logits = prefill[0][:, -1]
  token, done = _next_token(sampling_config, sampler, last_logits, 0, jnp.zeros((batch,), bool))
  if on_token is not None:
    jax.debug.callback(on_token, 0, token, ordered=True)
  tokens = jnp.zeros((batch, num_tokens), jnp.int32).at[:, 0].set(token)
  logits = jnp.zeros((batch, num_tokens if return_logits else 0, vocab), jnp.float32)
  if return_logits:
    logits = logits.at[:, 0].set(last_logits[:, :vocab])

  def feed(io, r):
    return lax.dynamic_index_in_dim(io.tokens, r, axis=1, keepdims=False)

  def emit(io, r, step_logits):
    token, done = _next_token(sampling_config, sampler, step_logits, r + 1, io.done)
    if on_token is not None:
      jax.debug.callback(on_token, r + 1, token, ordered=True)
    tokens = lax.dynamic_update_index_in_dim(io.tokens, token, r + 1, axis=1)
    logits = io.logits
    if return_logits:
      logits = lax.dynamic_update_index_in_dim(logits, step_logits[:, :vocab], r + 1, axis=1)
    return _GenerationIO(tokens, logits, done)

  io = engine.run(online, mixer, params, tables, constants, prompt, prefill, num_tokens - 1,
                  _GenerationIO(tokens, logits, done), feed, emit)
  return io.tokens, (io.logits if return_logits else None)


@functools.partial(jax.jit, static_argnames=("online", "mixer", "prompt_length"))
def _teacher_forced(params, tables, constants, tokens, *, online, mixer, prompt_length):
  batch, total = tokens.shape
  prompt = tokens[:, :prompt_length]
  prefill = online.prefill(params, prompt) if prompt_length else None
  logits = jnp.zeros((batch, total, online.config.padded_vocab_size), jnp.float32)
  if prefill is not None:
    logits = logits.at[:, :prompt_length].set(prefill[0])

  def feed(logits, r):
    return lax.dynamic_index_in_dim(tokens, prompt_length + r, axis=1, keepdims=False)

  def emit(logits, r, step_logits):
    return lax.dynamic_update_index_in_dim(logits, step_logits, prompt_length + r, axis=1)

  return engine.run(online, mixer, params, tables, constants, prompt, prefill,
                    total - prompt_length, logits, feed, emit)


def _prepare(params, config: HyenaConfig, strategy: str, num_steps: int, total: int, batch: int,
             options: EngineOptions):
  validation.check_params_match(config, params)
  online = HyenaOnline(config)
  mixer = engine.make_mixer(strategy, num_steps, online.num_streams * batch * online.width,
                            options)
  tables, constants = engine.prepare_tables(params, online=online, mixer=mixer, total=total)
  return online, mixer, tables, constants


def generate(params: Params, config: HyenaConfig, prompt_ids, num_tokens: int,
             key: Array | None = None, *, strategy: str = "flash",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, return_logits: bool = False, gumbel_noise=None,
             on_token: Callable[[int, np.ndarray], None] | None = None,
             options: EngineOptions | None = None, **engine_options) -> GenerationOutput:
  """Samples `num_tokens` tokens after `prompt_ids` from a Hyena language model, exactly.

  Args:
    params: `{'params': ...}` of `HyenaLM(config)`.
    config: the model's configuration.
    prompt_ids: (B, P) integer token ids, P >= 1, P + num_tokens - 1 <= config.l_max.
    num_tokens: N >= 1 tokens to generate.
    key: PRNG key (needed unless temperature=0 or `gumbel_noise` is given). The noise of step
      j is drawn from fold_in(key, j), so a key gives the same tokens with every strategy.
    strategy: 'flash' (default), 'lazy', 'eager' or 'recompute'.
    temperature: softmax temperature; 0 means greedy decoding.
    top_k, top_p: sample among the k most likely tokens / the smallest set of mass >= top_p.
    eos_id: a row stops at this token; its later tokens repeat it.
    return_logits: also return the logits of every step (B, N, vocab_size).
    gumbel_noise: (B, N, vocab_size) noise replacing the key's
      (token j = argmax(filtered logits_j / temperature + gumbel_noise[:, j])).
    on_token: called on the host as on_token(j, tokens (B,)) when token j is chosen, in
      order (for streaming output; costs a host round trip per token).
    options, **engine_options: `EngineOptions` (tau, layer_parallel, ...).

  Returns:
    GenerationOutput(tokens (B, N), lengths (B,), logits (B, N, vocab_size) or None).
  """
  options = EngineOptions.create(options, **engine_options)
  prompt = validation.check_token_ids(prompt_ids, config, name="prompt_ids")
  num_tokens = _positive_int(num_tokens, "num_tokens")
  batch, length = prompt.shape
  total = length + num_tokens - 1
  if total > config.l_max:
    raise ValueError(f"prompt length {length} + num_tokens {num_tokens} - 1 = {total} exceeds "
                     f"the model's maximum length l_max = {config.l_max}.")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  greedy = temperature == 0
  if top_k is not None:
    top_k = _positive_int(top_k, "top_k")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  if eos_id is not None and not (isinstance(eos_id, (int, np.integer))
                                 and 0 <= eos_id < config.vocab_size):
    raise ValueError(f"eos_id must be a token id in [0, {config.vocab_size}), got {eos_id!r}.")
  noise = None
  if gumbel_noise is not None:
    noise = jnp.asarray(gumbel_noise, jnp.float32)
    if noise.shape != (batch, num_tokens, config.vocab_size):
      raise ValueError(f"gumbel_noise must have shape (batch, num_tokens, vocab_size) = "
                       f"{(batch, num_tokens, config.vocab_size)}, got {noise.shape}.")
  elif key is None and not greedy:
    raise ValueError("sampling needs a PRNG key, e.g. jax.random.key(0) (or temperature=0 "
                     "for greedy decoding).")
  online, mixer, tables, constants = _prepare(params, config, strategy, num_tokens - 1, total,
                                             batch, options)
  sampler = _Sampler(noise, key if key is not None else jax.random.key(0),
                     jnp.float32(1.0 if greedy else temperature),
                     jnp.float32(1.0 if top_p is None else top_p),
                     None if eos_id is None else jnp.int32(eos_id))
  sampling_config = sampling.SamplingConfig(config.vocab_size, greedy, top_k, top_p is not None)
  tokens, logits = _generate(params, tables, constants, jnp.asarray(prompt), sampler,
                             online=online, mixer=mixer, sampling_config=sampling_config,
                             num_tokens=num_tokens, return_logits=return_logits,
                             on_token=on_token)
  return GenerationOutput(tokens, _lengths(tokens, eos_id), logits)


def teacher_forced_logits(params: Params, config: HyenaConfig, token_ids, *,
                          prompt_length: int = 0, strategy: str = "flash",
                          options: EngineOptions | None = None, **engine_options) -> Array:
  """Feeds given tokens one position at a time and returns the logits of every position.

  The first `prompt_length` tokens go through one parallel prefill, the rest through the
  online engine of `strategy`; the result equals the parallel forward `HyenaLM(config).apply`.

  Returns:
    (B, L, padded_vocab) float32.
  """
  options = EngineOptions.create(options, **engine_options)
  tokens = validation.check_token_ids(token_ids, config, name="token_ids")
  batch, total = tokens.shape
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or \
      not 0 <= prompt_length <= total:
    raise ValueError(f"prompt_length must be an integer in [0, {total}], got {prompt_length!r}.")
  online, mixer, tables, constants = _prepare(params, config, strategy, total - prompt_length,
                                             total, batch, options)
  return _teacher_forced(params, tables, constants, jnp.asarray(tokens), online=online,
                         mixer=mixer, prompt_length=int(prompt_length))


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def _lengths(tokens: Array, eos_id: int | None) -> Array:
  batch, num = tokens.shape
  if eos_id is None:
    return jnp.full((batch,), num, jnp.int32)
  is_end = tokens == eos_id
  return jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1) + 1, num).astype(jnp.int32)
