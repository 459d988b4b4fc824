"""`Decoder`: resumable, exact generation from a language model with any strategy.

  decoder = Decoder(params, config, strategy="flash")     # tables computed once, kept
  state = decoder.prefill(prompt_ids)                      # one parallel pass over the prompt
  out, state = decoder.generate(state, 100, key)           # 100 tokens
  out, state = decoder.generate(state, 50, key)            # 50 more, as if in one call
  logits, state = decoder.score(state, token_ids)          # feed given tokens (teacher forcing)

A `DecodeState` is a pytree: the engine's state (the model's carry, the strategy's state, the
position), the logits of the next token, the sampling step counter, the rows' done flags and
the sequence length. The noise of a sampled token comes from the absolute step index, so one
call of 200 tokens and calls of 50, 100 and 50 give the same tokens, with every strategy.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax import models
from lcsm_jax import validation
from lcsm_jax.decoding import memory
from lcsm_jax.decoding import sampling
from lcsm_jax.decoding import sharding as sharding_lib
from lcsm_jax.decoding.engine import Engine, EngineState
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.session import Session

Array = jax.Array


class GenerationOutput(NamedTuple):
  """tokens (B, N) int32 (after an end token, `eos_id` repeated); lengths (B,) tokens of this
  call up to and including the row's first end token (0 for rows that had ended before);
  logits (B, N, vocab_size) float32 of every sampled token, if requested."""

  tokens: Array
  lengths: Array
  logits: Array | None


class DecoderSignature(NamedTuple):
  """What a state must match to be continued by a decoder (static)."""
  model: Any       # the model adapter (its configuration)
  strategy: str
  max_length: int


@struct.dataclass
class DecodeState:
  """Where decoding stands (a pytree; arrays on the device).

  Attributes:
    engine: the engine's state (model carry, strategy state, positions fed).
    logits: (B, padded_vocab) float32, the logits of the next token.
    step: () int32, tokens sampled so far (the noise of the next one is that of this step).
    done: (B,) bool, rows that have emitted the end token.
    length: () int32, tokens in each sequence so far. It exceeds the decoder's max_length by
      one when the last sampled token could not be fed: the state is then final.
    signature: the decoder it belongs to (static).
  """
  engine: EngineState
  logits: Array
  step: Array
  done: Array
  length: Array
  signature: DecoderSignature = struct.field(pytree_node=False)

  @property
  def batch_size(self) -> int:
    return self.done.shape[0]


class _Sampler(NamedTuple):
  """The dynamic sampling inputs of one call."""
  keys: Array | None         # () the key (row b's: fold_in(key, b)), or (B,) row keys, or None
                             # (greedy or explicit noise)
  noise: Array | None        # (B, N, vocab_size) explicit Gumbel noise, or None
  temperature: Array         # ()
  top_p: Array               # ()
  eos_id: Array | None       # ()


class _GenerationIO(NamedTuple):
  tokens: Array   # (B, N + 1): token j of this call at j (the last slot is scratch)
  logits: Array   # (B, N + 1, V), or (B, 0, V) when not returned
  done: Array     # (B,)
  lengths: Array  # (B,)
  last: Array     # (B, padded_vocab): the logits of the latest fed position


def _prefill(params, tables, prompt, *, engine: Engine, signature: DecoderSignature,
             padded_vocab: int, return_logits: bool):
  batch, length = prompt.shape
  outputs, engine_state = engine.prefill(params, tables, prompt)
  last = (outputs[:, -1].astype(jnp.float32) if length
          else jnp.zeros((batch, padded_vocab), jnp.float32))
  state = DecodeState(engine_state, last, jnp.int32(0), jnp.zeros((batch,), bool),
                      jnp.int32(length), signature)
  if not return_logits:
    return state, None
  if not length:
    return state, jnp.zeros((batch, 0, padded_vocab), jnp.float32)
  return state, outputs.astype(jnp.float32)


def _generate(params, tables, state: DecodeState, sampler: _Sampler, *, engine: Engine,
              config: sampling.SamplingConfig, num_tokens: int, return_logits: bool,
              on_token: Callable | None):
  n, vocab = num_tokens, config.vocab_size
  batch = state.done.shape[0]
  keys = sampler.keys
  if keys is not None and keys.ndim == 0:
    keys = sampling.row_keys(keys, batch)

  def choose(logits, j, done):
    """Token j of this call (absolute step state.step + j) and the rows' done flags after it."""
    if config.greedy:
      noise = None
    elif sampler.noise is not None:
      noise = jax.lax.dynamic_index_in_dim(sampler.noise, j, axis=1, keepdims=False)
    else:
      noise = sampling.step_noise(keys, state.step + j, vocab)
    token = sampling.choose(logits, config, sampler.temperature, sampler.top_p, noise)
    if sampler.eos_id is None:
      return token, done
    token = jnp.where(done, sampler.eos_id, token)
    return token, done | (token == sampler.eos_id)

  def report(j, token):
    if on_token is not None:  # the host skips the scratch token j = n
      jax.debug.callback(lambda step, k, t: on_token(int(step), t) if k < n else None,
                         state.step + j, j, token, ordered=True)

  token, done = choose(state.logits, 0, state.done)
  report(0, token)
  io = _GenerationIO(
      tokens=jnp.zeros((batch, n + 1), jnp.int32).at[:, 0].set(token),
      logits=jnp.zeros((batch, n + 1 if return_logits else 0, vocab), jnp.float32),
      done=done, lengths=(~state.done).astype(jnp.int32), last=state.logits)
  if return_logits:
    io = io._replace(logits=io.logits.at[:, 0].set(state.logits[:, :vocab]))
  first = state.engine.position - state.engine.prompt_length  # online index of token 0

  def feed(io, r):
    return jax.lax.dynamic_index_in_dim(io.tokens, r - first, axis=1, keepdims=False)

  def emit(io, r, logits):
    j = r - first + 1  # the token these logits choose; j = n only refreshes `last`
    token, done = choose(logits, j, io.done)
    kept = j < n
    report(j, token)
    new = io._replace(tokens=jax.lax.dynamic_update_index_in_dim(io.tokens, token, j, axis=1),
                      done=jnp.where(kept, done, io.done),
                      lengths=io.lengths + (kept & ~io.done).astype(jnp.int32),
                      last=logits.astype(jnp.float32))
    if return_logits:
      new = new._replace(logits=jax.lax.dynamic_update_index_in_dim(
          io.logits, logits[:, :vocab].astype(jnp.float32), j, axis=1))
    return new

  # Feed every sampled token while there is room; a state at max_length keeps the last one.
  feeds = jnp.minimum(n, engine.max_length - state.length)
  engine_state, io = engine.run(params, tables, state.engine, feeds, io, feed, emit)
  new_state = DecodeState(engine_state, io.last, state.step + n, io.done, state.length + n,
                          state.signature)
  output = GenerationOutput(io.tokens[:, :n], io.lengths,
                            io.logits[:, :n] if return_logits else None)
  return output, new_state


def _score(params, tables, state: DecodeState, token_ids, *, engine: Engine):
  batch, n = token_ids.shape
  first = state.engine.position - state.engine.prompt_length
  logits = jnp.zeros((batch, n, state.logits.shape[-1]), jnp.float32)

  def feed(io, r):
    return jax.lax.dynamic_index_in_dim(token_ids, r - first, axis=1, keepdims=False)

  def emit(io, r, out):
    logits, _ = io
    out = out.astype(jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(logits, out, r - first, axis=1), out

  engine_state, (logits, last) = engine.run(params, tables, state.engine, n,
                                            (logits, state.logits), feed, emit)
  return logits, state.replace(engine=engine_state, logits=last, length=state.length + n)


_STATIC = ("engine", "config", "num_tokens", "return_logits", "on_token")
_PROGRAMS = {
    "prefill": jax.jit(_prefill, static_argnames=("engine", "signature", "padded_vocab",
                                                 "return_logits")),
    "generate": jax.jit(_generate, static_argnames=_STATIC),
    "generate_donating": jax.jit(_generate, static_argnames=_STATIC, donate_argnames="state"),
    "score": jax.jit(_score, static_argnames=("engine",)),
    "score_donating": jax.jit(_score, static_argnames=("engine",), donate_argnames="state"),
}


class Decoder(Session):
  """Exact (or, with an approximate strategy, its own) generation from a language model.

  Args:
    params: the model's parameters (`{'params': ...}` for a `HyenaLM(config)`).
    config: the model's configuration (a `HyenaConfig`; `models.online_model` maps it to the
      model family's adapter).
    strategy: a registered strategy name (`decoding.STRATEGIES`): 'flash' (default), 'lazy',
      'eager', 'recompute'.
    max_length: positions a sequence may reach, prompt included (default: the model's l_max).
      Tables and states are sized for it: smaller is cheaper.
    options: `EngineOptions` (and **engine_options overriding its fields).
    distilled: for strategy='modal', the distilled filters (`lcsm_jax.distill(...)`, or its
      `.filters`); max_length may then exceed the model's l_max (prompts may not).
    check_finite: refuse parameters holding NaN or infinity (one pass, here).
    donate_state: `generate` and `score` reuse the buffers of the state they are given for the
      state they return (half the peak memory of a long generation); the given state must not
      be used again. Off by default, so that a state can be continued several ways.
    mesh: a `jax.sharding.Mesh` to generate on (default: one device). Batch rows are split
      over its data axis and channels over its model axis: the parameters by the model's
      `param_partition`, the tables and every state by the strategy's layouts; the long
      convolutions' mixing runs on each device's shards (`jax.shard_map`, no communication),
      the model's step under jit as XLA partitions it. Batches must be multiples of the data
      axis' size and the model's width of the model axis' (ValueError otherwise).
    mesh_axes: (data axis, model axis): the mesh's axis names for batch rows and channels
      (default ("data", "model"); None: not split).
    step_weights: 'float32' (default) or 'bfloat16' (or the dtype): the dtype the one-token
      step reads its dense kernels in (in_proj, out_proj, fc1, fc2; cast once, with the
      tables). With 'bfloat16' the decoder runs the model with those kernels rounded to
      bfloat16 (prefill included; activations, accumulation and states stay float32): an
      approximation of the model, run exactly by every strategy.

  Raises:
    ValueError, TypeError: parameters that do not fit the config (named), non-finite
      parameters, an unknown strategy, a bad max_length or option.
  """

  def __init__(self, params, config, strategy: str = "flash", max_length: int | None = None,
               options: EngineOptions | None = None, *, distilled: Any = None,
               check_finite: bool = True, donate_state: bool = False,
               mesh: jax.sharding.Mesh | None = None,
               mesh_axes: tuple[str | None, str | None] = ("data", "model"),
               step_weights: Any = "float32", **engine_options):
    model = models.online_model(config, **(
        {} if _is_float32(step_weights) else {"step_weights": step_weights}))
    model.check_params(params)
    if check_finite:
      validation.check_finite(params)
    super().__init__(params, model, strategy, max_length,
                     EngineOptions.create(options, **engine_options),
                     aux=getattr(distilled, "filters", distilled),
                     sharding=sharding_lib.create(mesh, mesh_axes))
    self.config = config
    self.donate_state = bool(donate_state)
    self.signature = DecoderSignature(model, strategy, self.max_length)

  # -- the three operations --

  def prefill(self, prompt_ids, *, return_logits: bool = False):
    """One parallel pass over the prompt.

    Args:
      prompt_ids: (B, P) integer token ids, 0 <= P <= max_length (P = 0: nothing to sample
        from yet; `score` can follow).
      return_logits: also return the logits of every prompt position.
    Returns:
      The `DecodeState` after the prompt, or `(logits (B, P, padded_vocab), state)`.
    """
    prompt = validation.check_token_ids(prompt_ids, self.config, name="prompt_ids",
                                        allow_empty=True, max_length=self.prompt_limit)
    static = self._prefill_static(prompt.shape[0], return_logits)
    prompt = (jnp.asarray(prompt) if self.sharding is None else
              sharding_lib.place(self.sharding, prompt, sharding_lib.ROWS))
    compiled = self.compiled(_PROGRAMS["prefill"], static, self.params,
                             self.abstract_tables(), prompt)
    self.check_memory(lambda: {**self.table_parts(), "prefill (state included)":
                               memory.program_bytes(compiled)},
                      "use a smaller batch or max_length")
    state, logits = self._run(_PROGRAMS["prefill"], static, self.params, self.tables, prompt)
    return (logits, state) if return_logits else state

  def generate(self, state: DecodeState, num_tokens: int, key: Array | None = None, *,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               eos_id: int | None = None, return_logits: bool = False, row_keys=None,
               gumbel_noise=None, on_token: Callable[[int, np.ndarray], None] | None = None
               ) -> tuple[GenerationOutput, DecodeState]:
    """Samples `num_tokens` tokens after `state`.

    Args:
      state: from `prefill`, `generate` or `score` of this decoder (or one of the same model,
        strategy and max_length).
      num_tokens: N >= 1; the sequence may reach max_length + 1 tokens (the last sampled token
        need not be fed), so state.length + N - 1 <= max_length.
      key: PRNG key (unless greedy or `row_keys` / `gumbel_noise` is given). Row b draws the
        noise of step s from fold_in(fold_in(key, b), s), s = state.step + j for token j.
      temperature, top_k, top_p, eos_id: as in `lcsm_jax.generate` (temperature 0: greedy;
        a row that emitted eos_id repeats it).
      return_logits: also return the logits each token was sampled from.
      row_keys: (B,) keys instead of `key`: row b uses fold_in(row_keys[b], s).
      gumbel_noise: (B, N, vocab_size) noise replacing the key's for this call's tokens.
      on_token: called on the host as on_token(step, tokens (B,)) as each token is chosen.
    Returns:
      (GenerationOutput(tokens (B, N), lengths (B,), logits or None), the new state).
    """
    length = self._check_state(state)
    num_tokens = validation.check_positive_int(num_tokens, "num_tokens")
    batch = state.batch_size
    if length == 0:
      raise ValueError("the state holds no token to continue from: prefill at least one "
                       "token before generating.")
    if length + num_tokens - 1 > self.max_length:
      raise ValueError(_too_long(length, num_tokens, self.max_length, "generate", sample=True))
    temperature = sampling.check_temperature(temperature)
    greedy = temperature == 0
    if top_k is not None:
      top_k = validation.check_positive_int(top_k, "top_k")
    if top_p is not None and not 0 < top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    vocab = self.model.vocab_size
    if eos_id is not None and (isinstance(eos_id, (bool, np.bool_))
                               or not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < vocab):
      raise ValueError(f"eos_id must be an integer token id in [0, {vocab}), got {eos_id!r}.")
    noise = None
    if gumbel_noise is not None:
      noise = jnp.asarray(gumbel_noise, jnp.float32)
      if noise.shape != (batch, num_tokens, vocab):
        raise ValueError(f"gumbel_noise must have shape (batch, num_tokens, vocab_size) = "
                         f"{(batch, num_tokens, vocab)}, got {noise.shape}.")
    keys = None
    if not greedy and noise is None:
      keys = _row_keys(key, row_keys, batch)
    sampler = _Sampler(keys, noise, jnp.float32(1.0 if greedy else temperature),
                       jnp.float32(1.0 if top_p is None else top_p),
                       None if eos_id is None else jnp.int32(eos_id))
    static = dict(engine=self.engine(batch),
                  config=sampling.SamplingConfig(vocab, greedy, top_k, top_p is not None),
                  num_tokens=num_tokens, return_logits=bool(return_logits), on_token=on_token)
    result = self._continue("generate", static, state, sampler,
                            "generate fewer tokens per call or use a smaller batch")
    if on_token is not None:
      jax.effects_barrier()  # every callback has run when this returns
    return result

  def score(self, state: DecodeState, token_ids) -> tuple[Array, DecodeState]:
    """Feeds the given tokens one position at a time (teacher forcing).

    Args:
      state: as for `generate`.
      token_ids: (B, N) integer ids, N >= 1, state.length + N <= max_length.
    Returns:
      (logits (B, N, padded_vocab) float32 of every fed position, as the parallel forward
      gives them; the new state, whose `logits` are those of the last).
    """
    length = self._check_state(state)
    tokens = validation.check_token_ids(token_ids, self.config, name="token_ids",
                                        max_length=self.max_length)
    if tokens.shape[0] != state.batch_size:
      raise ValueError(f"token_ids has {tokens.shape[0]} rows, the state {state.batch_size}.")
    if length + tokens.shape[1] > self.max_length:
      raise ValueError(_too_long(length, tokens.shape[1], self.max_length, "score"))
    static = dict(engine=self.engine(state.batch_size))
    return self._continue("score", static, state, jnp.asarray(tokens),
                          "score fewer tokens per call or use a smaller batch")

  # -- estimates --

  def state_shape(self, batch: int, prompt_length: int) -> DecodeState:
    """The `DecodeState` after a prompt, as `jax.ShapeDtypeStruct`s (nothing runs)."""
    prompt = jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32)
    return self.shapes(_prefill, self._prefill_static(batch, False), self.params,
                       self.abstract_tables(), prompt)[0]

  def estimate_memory(self, batch: int, prompt_length: int, num_tokens: int | None = None, *,
                      score_tokens: int | None = None, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None,
                      eos_id: int | None = None, return_logits: bool = False
                      ) -> dict[str, int]:
    """Bytes a run would need, by XLA's analysis of its compiled programs (compiled from shapes
    only; nothing runs): the parameters, the filter tables (unless already built) with their
    computation, the prefill program (the state included), and, when given, the generation of
    `num_tokens` tokens with the given sampling options (as `generate` with one `key`: the
    compiled program is the one such a call then runs) and the scoring of `score_tokens`."""
    prompt = jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32)
    tables = self.abstract_tables()
    prefill = self.compiled(_PROGRAMS["prefill"], self._prefill_static(batch, False),
                            self.params, tables, prompt)
    parts = {"parameters": memory.tree_bytes(self.params), **self.table_parts(),
             "prefill (state included)": memory.program_bytes(prefill)}
    state = self.state_shape(batch, prompt_length) if num_tokens or score_tokens else None
    suffix = "_donating" if self.donate_state else ""
    if num_tokens is not None:
      greedy = sampling.check_temperature(temperature) == 0
      key = None if greedy else jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
      scalar = jax.ShapeDtypeStruct((), jnp.float32)
      eos = None if eos_id is None else jax.ShapeDtypeStruct((), jnp.int32)
      sampler = _Sampler(key, None, scalar, scalar, eos)
      static = dict(engine=self.engine(batch),
                    config=sampling.SamplingConfig(self.model.vocab_size, greedy, top_k,
                                                   top_p is not None),
                    num_tokens=num_tokens, return_logits=bool(return_logits), on_token=None)
      parts["generation"] = memory.program_bytes(self.compiled(
          _PROGRAMS["generate" + suffix], static, self.params, tables, state, sampler))
    if score_tokens is not None:
      ids = jax.ShapeDtypeStruct((batch, score_tokens), jnp.int32)
      parts["scoring"] = memory.program_bytes(self.compiled(
          _PROGRAMS["score" + suffix], dict(engine=self.engine(batch)), self.params, tables,
          state, ids))
    return parts

  def check_request(self, batch: int, prompt_length: int, num_tokens: int | None = None, *,
                    advice: str, **sampling_options) -> None:
    """Refuses, before anything runs, a request whose memory (`estimate_memory` without the
    parameters, which are already in memory) exceeds what is available; `sampling_options`
    (temperature, top_k, top_p, eos_id, return_logits) as for `estimate_memory`."""
    if self.options.check_memory:
      parts = self.estimate_memory(batch, prompt_length, num_tokens, **sampling_options)
      parts.pop("parameters")
      self.check_memory(parts, advice)

  # -- internals --

  def _prefill_static(self, batch: int, return_logits: bool) -> dict[str, Any]:
    return dict(engine=self.engine(batch), signature=self.signature,
                padded_vocab=self.model.padded_vocab_size, return_logits=bool(return_logits))

  def _check_state(self, state: DecodeState) -> int:
    """The state's length (read from the device), after checking it belongs here."""
    if not isinstance(state, DecodeState):
      raise TypeError(f"state must be a DecodeState (from Decoder.prefill), got "
                      f"{type(state).__name__}.")
    if state.signature != self.signature:
      mine, theirs = self.signature, state.signature
      differences = [f"{name} {getattr(theirs, name)!r} (this decoder: {getattr(mine, name)!r})"
                     for name in mine._fields if getattr(mine, name) != getattr(theirs, name)]
      raise ValueError("this state belongs to another decoder: " + "; ".join(differences) + ".")
    return int(jax.device_get(state.length))

  def _continue(self, kind: str, static: dict, state: DecodeState, inputs, advice: str):
    program = _PROGRAMS[f"{kind}_donating" if self.donate_state else kind]
    inputs = self.put(inputs)
    compiled = self.compiled(program, static, self.params, self.tables, state, inputs)
    self.check_memory(lambda: {kind: memory.program_bytes(compiled)}, advice)
    return compiled(self.params, self.tables, state, inputs)


def _is_float32(step_weights: Any) -> bool:
  """Whether `step_weights` asks for the default float32 (checked, so a bad value raises)."""
  return validation.check_step_weights(step_weights) == "float32"


def _too_long(length: int, count: int, max_length: int, what: str, sample: bool = False) -> str:
  if length > max_length:
    return (f"the state is final: its sequence already holds {length} tokens, one more than "
            f"max_length = {max_length} (the last sampled token could not be fed); nothing can "
            "follow it.")
  need = length + count - (1 if sample else 0)
  return (f"cannot {what} {count} tokens after {length}: that needs {need} positions, more than "
          f"max_length = {max_length}; make a Decoder with a larger max_length (up to the "
          "model's l_max) or ask for fewer tokens.")


def _row_keys(key, row_keys, batch: int) -> Array:
  """`row_keys` (B,) as given, else `key` (the program folds in each row's index)."""
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
    raise ValueError("sampling needs a PRNG key, e.g. jax.random.key(0), or row_keys (or "
                     "temperature=0 for greedy decoding).")
  key = jnp.asarray(key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != (2,) or key.dtype != jnp.uint32:
      raise TypeError(f"key must be a PRNG key from jax.random.key (or PRNGKey), got dtype "
                      f"{key.dtype} and shape {key.shape}.")
    key = jax.random.wrap_key_data(key)
  if key.shape != ():
    raise ValueError(f"key must be one PRNG key (shape ()), got shape {key.shape}; for one key "
                     "per row pass row_keys=.")
  return key
