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
from lcsm_jax import memory
from lcsm_jax import sampling
from lcsm_jax import validation
from lcsm_jax.engine import EngineOptions
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.params import check_params_match
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
  """Dynamic sampling inputs: noise (B, N, V) or None, row keys (B,), temperature, top_p,
  eos_id or None."""
  noise: Array | None
  keys: Array
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
    noise = sampling.step_noise(s.keys, index, cfg.vocab_size)
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
             options: EngineOptions, check_finite: bool):
  check_params_match(config, params)
  if check_finite:
    validation.check_finite(params)
  online = HyenaOnline(config)
  mixer = engine.make_mixer(strategy, num_steps, online.num_streams * batch * online.width,
                            options)
  return online, mixer


def _check_memory(program, args: tuple, static: dict, params, online, mixer, total: int,
                  advice: str) -> None:
  """Refuses a run whose parameters, filter tables and compiled program exceed the available
  memory, before anything runs (`EngineOptions.check_memory`)."""
  needed = _estimate(program, _signature(args), tuple(sorted(static.items())),
                     _signature(params), online, mixer, total)
  memory.check_fits(dict(needed), advice=advice + " (or pass check_memory=False to run anyway).")


def _signature(tree) -> tuple:
  """A hashable description of a pytree's structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), getattr(x, "dtype", None) or jnp.result_type(x))
                        for x in leaves)


def _abstract(signature: tuple):
  treedef, leaves = signature
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])


@functools.lru_cache(maxsize=64)
def _estimate(program, args, static, params, online, mixer, total: int) -> tuple:
  """(name, bytes) of what a run needs: XLA's memory analysis of the compiled table and
  generation programs (compiled here from shapes only; `jit` reuses the compilation)."""
  params, args = _abstract(params), _abstract(args)
  prepare = functools.partial(engine.prepare_tables, online=online, mixer=mixer, total=total)
  tables = jax.eval_shape(prepare, params)
  table_program = engine.prepare_tables.lower(params, online=online, mixer=mixer, total=total)
  run_program = program.lower(params, *tables, *args, **dict(static))
  table_bytes = memory.tree_bytes(tables)
  return (("parameters", memory.tree_bytes(params)), ("filter tables", table_bytes),
          ("working memory", max(memory.program_bytes(table_program.compile()) - table_bytes,
                                 memory.program_bytes(run_program.compile()))))


def generate(params: Params, config: HyenaConfig, prompt_ids, num_tokens: int,
             key: Array | None = None, *, strategy: str = "flash",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, return_logits: bool = False, gumbel_noise=None,
             row_keys=None, on_token: Callable[[int, np.ndarray], None] | None = None,
             check_finite: bool = True, options: EngineOptions | None = None,
             **engine_options) -> GenerationOutput:
  """Samples `num_tokens` tokens after `prompt_ids` from a Hyena language model, exactly.

  Args:
    params: `{'params': ...}` of `HyenaLM(config)`.
    config: the model's configuration.
    prompt_ids: (B, P) integer token ids, P >= 1, P + num_tokens - 1 <= config.l_max.
    num_tokens: N >= 1 tokens to generate.
    key: PRNG key (needed unless temperature=0, or `row_keys` or `gumbel_noise` is given).
      Row b draws the noise of step j from fold_in(fold_in(key, b), j): a row's tokens depend
      on its prompt, its index and the key, not on the strategy, batch size or other rows.
    strategy: 'flash' (default), 'lazy', 'eager' or 'recompute'.
    temperature: softmax temperature; 0 means greedy decoding. Values are clamped to
      [sampling.MIN_TEMPERATURE, sampling.MAX_TEMPERATURE] (1e-30 and 1e30: to float32
      precision, greedy and uniform among the filtered tokens).
    top_k, top_p: sample among the k most likely tokens / the smallest set of mass >= top_p.
    eos_id: a row stops at this token; its later tokens repeat it.
    return_logits: also return the logits of every step (B, N, vocab_size).
    gumbel_noise: (B, N, vocab_size) noise replacing the key's
      (token j = argmax(filtered logits_j + temperature * gumbel_noise[:, j])).
    row_keys: (B,) PRNG keys, one per row, instead of `key`: row b draws the noise of step j
      from fold_in(row_keys[b], j), so its tokens do not depend on its place in the batch.
    on_token: called on the host as on_token(j, tokens (B,)) when token j is chosen, in
      order (for streaming output; costs a host round trip per token).
    check_finite: refuse parameters holding NaN or infinity (one pass over the parameters,
      outside the token loop).
    options, **engine_options: `EngineOptions` (tau, layer_parallel, ..., check_memory).

  Returns:
    GenerationOutput(tokens (B, N), lengths (B,), logits (B, N, vocab_size) or None).

  Raises:
    ValueError, TypeError: bad input, named. `memory.InsufficientMemoryError` (a ValueError):
      the run's estimated memory exceeds what is available (before anything runs).
  """
  options = EngineOptions.create(options, **engine_options)
  prompt = validation.check_token_ids(prompt_ids, config, name="prompt_ids")
  num_tokens = _positive_int(num_tokens, "num_tokens")
  batch, length = prompt.shape
  total = length + num_tokens - 1
  if total > config.l_max:
    raise ValueError(f"prompt length {length} + num_tokens {num_tokens} - 1 = {total} exceeds "
                     f"the model's maximum length l_max = {config.l_max}.")
  temperature = sampling.check_temperature(temperature)
  greedy = temperature == 0
  if top_k is not None:
    top_k = _positive_int(top_k, "top_k")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  if eos_id is not None and (isinstance(eos_id, (bool, np.bool_))
                             or not isinstance(eos_id, (int, np.integer))
                             or not 0 <= eos_id < config.vocab_size):
    raise ValueError(f"eos_id must be an integer token id in [0, {config.vocab_size}), got "
                     f"{eos_id!r}.")
  noise = None
  if gumbel_noise is not None:
    noise = jnp.asarray(gumbel_noise, jnp.float32)
    if noise.shape != (batch, num_tokens, config.vocab_size):
      raise ValueError(f"gumbel_noise must have shape (batch, num_tokens, vocab_size) = "
                       f"{(batch, num_tokens, config.vocab_size)}, got {noise.shape}.")
  keys = _row_keys(key, row_keys, batch, needed=not greedy and noise is None)
  online, mixer = _prepare(params, config, strategy, num_tokens - 1, total, batch, options,
                           check_finite)
  sampler = _Sampler(noise, keys, jnp.float32(1.0 if greedy else temperature),
                     jnp.float32(1.0 if top_p is None else top_p),
                     None if eos_id is None else jnp.int32(eos_id))
  sampling_config = sampling.SamplingConfig(config.vocab_size, greedy, top_k, top_p is not None)
  static = dict(online=online, mixer=mixer, sampling_config=sampling_config,
                num_tokens=num_tokens, return_logits=return_logits, on_token=on_token)
  if options.check_memory:
    _check_memory(_generate, (prompt, sampler), static, params, online, mixer, total,
                  "reduce the batch size or the number of tokens")
  tables, constants = engine.prepare_tables(params, online=online, mixer=mixer, total=total)
  tokens, logits = _generate(params, tables, constants, jnp.asarray(prompt), sampler, **static)
  return GenerationOutput(tokens, _lengths(tokens, eos_id), logits)


def _row_keys(key, row_keys, batch: int, needed: bool) -> Array:
  """(B,) keys for the rows: `row_keys` as given, else fold_in(key, b)."""
  if row_keys is not None:
    if key is not None:
      raise ValueError("give either key or row_keys, not both.")
    keys = jnp.asarray(row_keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      if keys.dtype != jnp.uint32 or keys.ndim != 2:
        raise TypeError(f"row_keys must be (batch,) PRNG keys from jax.random.key / split, "
                        f"got dtype {keys.dtype} and shape {keys.shape}.")
      keys = jax.random.wrap_key_data(keys)
    if keys.shape != (batch,):
      raise ValueError(f"row_keys must hold one key per row: shape ({batch},), got "
                       f"{keys.shape}.")
    return keys
  if key is None:
    if needed:
      raise ValueError("sampling needs a PRNG key, e.g. jax.random.key(0), or row_keys (or "
                       "temperature=0 for greedy decoding).")
    key = jax.random.key(0)
  return sampling.row_keys(key, batch)


def teacher_forced_logits(params: Params, config: HyenaConfig, token_ids, *,
                          prompt_length: int = 0, strategy: str = "flash",
                          check_finite: bool = True, options: EngineOptions | None = None,
                          **engine_options) -> Array:
  """Feeds given tokens one position at a time and returns the logits of every position.

  The first `prompt_length` tokens go through one parallel prefill, the rest through the
  online engine of `strategy`; the result equals the parallel forward `HyenaLM(config).apply`.
  `check_finite` and the options are as in `generate`.

  Returns:
    (B, L, padded_vocab) float32.
  """
  options = EngineOptions.create(options, **engine_options)
  tokens = validation.check_token_ids(token_ids, config, name="token_ids")
  batch, total = tokens.shape
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or \
      not 0 <= prompt_length <= total:
    raise ValueError(f"prompt_length must be an integer in [0, {total}], got {prompt_length!r}.")
  online, mixer = _prepare(params, config, strategy, total - prompt_length, total, batch,
                           options, check_finite)
  static = dict(online=online, mixer=mixer, prompt_length=int(prompt_length))
  if options.check_memory:
    _check_memory(_teacher_forced, (tokens,), static, params, online, mixer, total,
                  "score fewer or shorter sequences at a time")
  tables, constants = engine.prepare_tables(params, online=online, mixer=mixer, total=total)
  return _teacher_forced(params, tables, constants, jnp.asarray(tokens), **static)


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
