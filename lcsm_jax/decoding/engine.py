"""The decoding engine, independent of the model and of the strategy: filter tables, prefill,
and runs of online positions. Its functions are traced inside the compiled programs of
`Session` (and its `Decoder`); an `Engine` is hashable, a static argument of those programs.

  prompt --prefill--> EngineState --run(count)--> EngineState --run(count)--> ...

Positions are numbered from 0; after a prompt of P positions the state covers positions
[0, position), and online position r is absolute position P + r. The strategy's state is sized
for the engine's `max_length` = P + M positions.

With a `sharding` (a device mesh), the tables and states are pinned to their layouts (batch rows
on the data axis, channels on the model axis), and a channel-local strategy's `init`, `pending`
and `update` run on each device's shards (`decoding.sharding.local`); the model's prefill and
step run under jit as XLA partitions them (the step traced inside `cpu_kernels.disabled()`: XLA
splits its dots over the mesh, while it would gather the operands of a CPU custom call). The
per-shard functions use the CPU kernels again (e.g. modal's `cpu_kernels.modal_step`): their
operands are one device's shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import cpu_kernels
from lcsm_jax import convolution
from lcsm_jax.decoding import sharding as sharding_lib
from lcsm_jax.decoding.interfaces import IO, Emit, Feed, Steps, Strategy
from lcsm_jax.models.interface import BATCH, CHANNELS, OnlineModel, Params, Prefill

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
    sharding: the device mesh and its axes (`decoding.sharding.Sharding`), or None (one
      device).
  """

  model: OnlineModel
  strategy: Strategy
  max_length: int
  sharding: sharding_lib.Sharding | None = None

  def local(self, fn, in_layouts: tuple, out_layout: Any):
    """`fn` on each device's shards (`decoding.sharding.local`); `fn` itself on one device."""
    return sharding_lib.local(self.sharding, fn, in_layouts, out_layout)

  def conv_options(self) -> dict[str, Any]:
    """The model's `conv=` argument on a mesh: the FFT convolution on each device's shards
    (batch rows and channels; no communication, where XLA under plain jit all-gathers an FFT's
    inputs along the unsharded time axis, jax issue 15680). Empty on one device (the model's
    own convolution)."""
    if self.sharding is None:
      return {}
    rows_time_channels = PartitionSpec(BATCH, None, CHANNELS)  # u (B, L, D)

    def conv(u, h, *, skip=None, stream=None):  # the arguments of `causal_conv_fft`
      args = {"u": (u, rows_time_channels),
              "h": (h, PartitionSpec(None, CHANNELS) if stream is None else sharding_lib.TAPS)}
      if skip is not None:
        args["skip"] = (skip, PartitionSpec(CHANNELS))
      if stream is not None:
        args["stream"] = (jnp.asarray(stream, jnp.int32), sharding_lib.REPLICATED)
      names = tuple(args)
      on_shards = lambda *values: convolution.causal_conv_fft(**dict(zip(names, values)))
      return self.local(on_shards, tuple(layout for _, layout in args.values()),
                        rows_time_channels)(*(value for value, _ in args.values()))

    conv.fuses_skip = True
    return {"conv": conv}

  def _prefill_taps(self, tables: EngineTables, length: int) -> Array | None:
    """The strategy's filters for the prefill (None: the model's own); on a mesh, a
    channel-local strategy computes them on each device's shards (e.g. modal's taps from its
    poles, which XLA would otherwise gather)."""
    taps = lambda t: self.strategy.prefill_taps(t, length)
    if (self.sharding is None or not self.strategy.channel_local
        or jax.eval_shape(taps, tables.strategy) is None):
      return taps(tables.strategy)
    return self.local(taps, (self.strategy.table_layout(tables.strategy),),
                      sharding_lib.TAPS)(tables.strategy)

  def state_layout(self, state: EngineState) -> EngineState:
    """Logical PartitionSpecs of an engine state (`state` may be abstract)."""
    carry = getattr(self.model, "carry_partition", lambda carry: sharding_lib.REPLICATED)
    return EngineState(carry(state.carry), self.strategy.state_layout(state.strategy),
                       sharding_lib.REPLICATED, prompt_length=state.prompt_length)

  def constrain_state(self, state: EngineState) -> EngineState:
    """`state` pinned to its layout on the mesh (no-op on one device)."""
    if self.sharding is None:
      return state
    return sharding_lib.constrain(self.sharding, state, self.state_layout(state))

  def prepare(self, params: Params, aux: Any = None) -> EngineTables:
    """Filters of `max_length` taps (one, for strategies that do not need them) and the
    strategy's tables (`aux`: its extra inputs)."""
    taps, diagonal = self.model.filters(params, self.max_length if self.strategy.needs_taps
                                        else 1)
    if self.sharding is not None and self.strategy.channel_local:
      prepare = lambda t, a: self.strategy.prepare(t, a)
      layout = self.strategy.table_layout(jax.eval_shape(prepare, taps, aux))
      tables = self.local(prepare, (sharding_lib.TAPS, self.strategy.aux_layout(aux)),
                          layout)(taps, aux)
    else:
      tables = self.strategy.prepare(taps, aux)
    tables = sharding_lib.constrain(self.sharding, tables, self.strategy.table_layout(tables))
    return EngineTables(tables, self.model.constants(params, diagonal))

  def prefill(self, params: Params, tables: EngineTables, prompt: Array
              ) -> tuple[Array | None, EngineState]:
    """The parallel pass over `prompt` (B, P, ...), P >= 0.

    Returns:
      (the model's outputs at the prompt positions (B, P, ...), or None for P = 0; the state).
    """
    batch, length = prompt.shape[:2]
    if length:
      prefill = self.model.prefill(params, prompt, self._prefill_taps(tables, length),
                                   **self.conv_options())
    else:
      conv_inputs = jnp.zeros((0, self.model.num_streams, batch, self.model.width), jnp.float32)
      prefill = Prefill(None, conv_inputs, self.model.initial_carry(params, batch))
    num_steps = self.max_length - length
    if self.sharding is not None and self.strategy.channel_local:
      init = lambda t, c: self.strategy.init(t, None, Prefill(None, c, None), num_steps)
      state = self.local(init, (self.strategy.table_layout(tables.strategy),
                                sharding_lib.TIME_MAJOR),
                         self.strategy.state_layout(jax.eval_shape(
                             init, tables.strategy, prefill.conv_inputs)))(
                                 tables.strategy, prefill.conv_inputs)
    else:
      state = self.strategy.init(tables.strategy, prompt, prefill, num_steps)
    return prefill.outputs, self.constrain_state(
        EngineState(prefill.carry, state, jnp.asarray(length, jnp.int32), prompt_length=length))

  def run(self, params: Params, tables: EngineTables, state: EngineState, count, io: IO,
          feed: Feed, emit: Emit) -> tuple[EngineState, IO]:
    """`count` positions from `state.position` (may be traced; the caller keeps
    position + count <= max_length). Position p's input is `feed(io, r)` and its output goes to
    `emit(io, r, output)`, with r = p - prompt_length the online position."""
    length = state.prompt_length
    steps = Steps(step=lambda carry, x, pending: self.model.step(params, tables.constants,
                                                                 carry, x, pending),
                  forward=lambda inputs: self.model.forward(params, inputs,
                                                            **self.conv_options()), feed=feed,
                  emit=emit, local=self.local)
    on_mesh = cpu_kernels.disabled() if self.sharding is not None else contextlib.nullcontext()
    with on_mesh:  # custom calls are not split over a mesh: keep the step's XLA dots there
      strategy_state, carry, io = self.strategy.run(
          tables.strategy, state.strategy, steps, state.carry, io, state.position - length,
          count, self.max_length - length)
    return self.constrain_state(
        EngineState(carry, strategy_state, state.position + count, length)), io
