"""The decoding engine, independent of the model and of the strategy: filter tables, prefill,
and runs of online positions. Its functions are traced inside the compiled programs of
`Session` (and its `Decoder`); an `Engine` is hashable, a static argument of those programs.

  prompt --prefill--> EngineState --run(count)--> EngineState --run(count)--> ...

Positions are numbered from 0; after a prompt of P positions the state covers positions
[0, position), and online position r is absolute position P + r. The strategy's state is sized
for the engine's `max_length` = P + M positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp

from lcsm_jax.decoding.interfaces import IO, Emit, Feed, Steps, Strategy
from lcsm_jax.models.interface import OnlineModel, Params, Prefill

Array = jax.Array


class EngineTables(NamedTuple):
  """Computed once per model and length, outside the token loop."""
  strategy: Any   # the strategy's tables (filter taps, spectra, ...)
  constants: Any  # `model.constants`: what the step reads besides params, as separate buffers


@struct.dataclass
class EngineState:
  """The per-sequence state: the model's carry, the strategy's state, and the position.

  `prompt_length` is static (part of the compiled programs' signature): the strategy's plan
  covers positions [prompt_length, max_length).
  """
  carry: Any
  strategy: Any
  position: Array  # () int32: positions fed so far
  prompt_length: int = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Engine:
  """A model, a strategy and the longest sequence they serve.

  Attributes:
    model: the model's online adapter (`models.interface.OnlineModel`).
    strategy: a configured strategy (`decoding.strategies.create`).
    max_length: T, the positions the tables and states are sized for (<= model.max_length).
  """

  model: OnlineModel
  strategy: Strategy
  max_length: int

  def prepare(self, params: Params, aux: Any = None) -> EngineTables:
    """Filters of `max_length` taps (one, for strategies that do not need them) and the
    strategy's tables (`aux`: its extra inputs)."""
    taps, diagonal = self.model.filters(params, self.max_length if self.strategy.needs_taps
                                        else 1)
    return EngineTables(self.strategy.prepare(taps, aux), self.model.constants(params, diagonal))

  def prefill(self, params: Params, tables: EngineTables, prompt: Array
              ) -> tuple[Array | None, EngineState]:
    """The parallel pass over `prompt` (B, P, ...), P >= 0.

    Returns:
      (the model's outputs at the prompt positions (B, P, ...), or None for P = 0; the state).
    """
    batch, length = prompt.shape[:2]
    if length:
      prefill = self.model.prefill(params, prompt,
                                   self.strategy.prefill_taps(tables.strategy, length))
    else:
      conv_inputs = jnp.zeros((0, self.model.num_streams, batch, self.model.width), jnp.float32)
      prefill = Prefill(None, conv_inputs, self.model.initial_carry(params, batch))
    state = self.strategy.init(tables.strategy, prompt, prefill, self.max_length - length)
    return prefill.outputs, EngineState(prefill.carry, state, jnp.asarray(length, jnp.int32),
                                        prompt_length=length)

  def run(self, params: Params, tables: EngineTables, state: EngineState, count, io: IO,
          feed: Feed, emit: Emit) -> tuple[EngineState, IO]:
    """`count` positions from `state.position` (may be traced; the caller keeps
    position + count <= max_length). Position p's input is `feed(io, r)` and its output goes to
    `emit(io, r, output)`, with r = p - prompt_length the online position."""
    length = state.prompt_length
    steps = Steps(step=lambda carry, x, pending: self.model.step(params, tables.constants,
                                                                 carry, x, pending),
                  forward=lambda inputs: self.model.forward(params, inputs), feed=feed,
                  emit=emit)
    strategy_state, carry, io = self.strategy.run(
        tables.strategy, state.strategy, steps, state.carry, io, state.position - length,
        count, self.max_length - length)
    return EngineState(carry, strategy_state, state.position + count, length), io
