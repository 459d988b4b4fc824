"""What the strategies that keep the long convolutions' state share: the token loop, and row
access to time-major buffers (positions, streams, batch, channels).

Every token loop reads the next position's pending outputs at the end of an iteration, after
all writes to the state, and carries them as a small array: a step that read them from the
large state buffers itself would let XLA fuse those reads into the writes of other buffers,
and, unable to order them, copy every buffer at every step (WORKSPACE.md, performance notes).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
from jax import lax

from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.interfaces import IO, State, Steps, Tables
from lcsm_jax.models.interface import Carry, OnlineModel

Array = jax.Array


def read_row(buffer: Array, r: Array) -> Array:
  return lax.dynamic_index_in_dim(buffer, r, axis=0, keepdims=False)


def write_row(buffer: Array, r: Array, row: Array) -> Array:
  return lax.dynamic_update_index_in_dim(buffer, row.astype(buffer.dtype), r, axis=0)


def token_loop(step: Callable[[Any, Array, Array], tuple[Any, Array]],
               pending: Callable[[State, Array], Array],
               update: Callable[[State, Array, Array], State], state: State, rest: Any, start,
               count) -> tuple[State, Any]:
  """Positions r = start .. start + count - 1 (both may be traced).

  Args:
    step: (rest, pending (S, B, D), r) -> (rest, inputs (S, B, D)): the model at position r.
    pending: (state, r) -> the pending outputs (S, B, D) of position r.
    update: (state, r, inputs) -> the state after position r.
  """

  def body(r, carry):
    state, rest, pend = carry
    rest, inputs = step(rest, pend, r)
    state = update(state, r, inputs)
    return state, rest, pending(state, r + 1)

  state, rest, _ = lax.fori_loop(start, start + count, body, (state, rest, pending(state, start)))
  return state, rest


class StrategyBase:
  """Defaults of the optional parts of the `Strategy` interface."""

  needs_taps: ClassVar[bool] = True   # prepare reads the model's filters for every position
  unbounded: ClassVar[bool] = False   # sequences may grow past the model's filter length
  channel_local: ClassVar[bool] = False  # init reads only prefill.conv_inputs, and init,
                                         # pending and update treat rows and channels apart
  supplies_filters: ClassVar[bool] = False  # prefill_taps gives the filters from the tables,
                                         # and nothing after prepare reads the model's own

  @classmethod
  def check_aux(cls, aux: Any, model: OnlineModel) -> None:
    """Raises a ValueError unless `aux` (the strategy's extra inputs) fits `model`."""
    if aux is not None:
      raise ValueError(f"strategy {cls.name!r} takes no distilled filters (distilled= is for "
                       "strategy='modal').")

  def prefill_taps(self, tables: Tables, length: int) -> Array | None:
    """Long filters (length, S, D) the model's parallel prefill uses instead of its own, or
    None (the model's own)."""
    return None

  def loop_tables(self, tables: Tables, num_steps: int) -> Tables:
    """The tables as the token loop of a plan of `num_steps` steps reads them (default: as
    they are): a strategy may cut them to what that loop needs, once per call."""
    return tables

  def aux_layout(self, aux: Any) -> Any:
    """Logical PartitionSpecs of `aux` (default: replicated)."""
    return sharding.REPLICATED


class MixingStrategy(StrategyBase):
  """Base of the strategies that keep the long convolutions' state and call the model's step:
  they define `pending` and `update`, and inherit `run`. Their `init` reads only
  `prefill.conv_inputs`, and `init`, `pending` and `update` treat batch rows and channels
  independently: on a mesh they run on each device's shards (`Steps.local`)."""

  channel_local: ClassVar[bool] = True

  def pending(self, tables: Tables, state: State, r) -> Array:
    """(S, B, D): the contributions of all positions before online position r."""
    raise NotImplementedError

  def update(self, tables: Tables, state: State, r, inputs: Array, num_steps: int) -> State:
    """The state after online position r, whose long-convolution inputs are (S, B, D)."""
    raise NotImplementedError

  def run(self, tables: Tables, state: State, steps: Steps, carry: Carry, io: IO, start, count,
          num_steps: int) -> tuple[State, Carry, IO]:
    def step(rest, pending, r):
      carry, io, x = rest  # x: the input at r, read at the end of the previous iteration
      carry, inputs, output = steps.step(carry, x, pending)
      io = steps.emit(io, r, output)
      return (carry, io, steps.feed(io, r + 1)), inputs

    tables = self.loop_tables(tables, num_steps)
    tables_in, state_in = self.table_layout(tables), self.state_layout(state)
    pending = steps.local(lambda t, s, r: self.pending(t, s, r),
                          (tables_in, state_in, sharding.REPLICATED), sharding.STREAMS)
    update = steps.local(lambda t, s, r, a: self.update(t, s, r, a, num_steps),
                         (tables_in, state_in, sharding.REPLICATED, sharding.STREAMS), state_in)
    state, (carry, io, _) = token_loop(
        step, lambda s, r: pending(tables, s, r), lambda s, r, a: update(tables, s, r, a),
        state, (carry, io, steps.feed(io, start)), start, count)
    return state, carry, io
