"""The decoding strategy interface, and what the engine hands a strategy for one run.

A strategy decides how the long convolutions' pending outputs are computed during generation:

  prepare(taps (T, S, D), aux)                      -> tables, once per model (outside the loop)
  init(tables, prompt (B, P, ...), prefill, M)      -> state after the prompt
  run(tables, state, steps, carry, io, start, count, M) -> (state, carry, io)

`run` drives online positions r = start .. start + count - 1 (absolute position P + r; M online
positions in all, the engine's max_length minus P) through `steps`: the model's one-position
step, its parallel forward, and the caller's `feed` (the input at r) and `emit` (what to keep
from the output at r). `start` and `count` may be traced; M is static. Strategies that keep
the convolutions' state and call the model's step derive from `strategies.base.MixingStrategy`,
which supplies `run`; others (recompute) drive the model themselves. `strategies.base.
StrategyBase` gives the defaults of the optional members (`needs_taps`, `unbounded`,
`check_aux`, `prefill_taps`, `aux_layout`).

On a device mesh (`decoding.sharding`), a strategy says which axes of its tables and state hold
batch rows and channels (`table_layout`, `state_layout`: logical PartitionSpecs); the engine
places them, and a `MixingStrategy` runs its `init`, `pending` and `update` on local shards
(`Steps.local`), so that their code sees only its own rows and channels.

S streams, B batch rows, D channels, P prompt positions, T = P + M.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax

from lcsm_jax.models.interface import Carry, Prefill

Array = jax.Array
Tables = Any  # a strategy's per-model tables (filter taps, spectra, ...)
State = Any   # a strategy's per-sequence state
IO = Any      # what the caller threads through the loop (tokens, logits, outputs ...)
Feed = Callable[[IO, Array], Array]        # (io, r) -> the model's input at online position r
Emit = Callable[[IO, Array, Array], IO]    # (io, r, output at r) -> io
# (fn, logical layouts of fn's arguments, of its result) -> fn run on each device's shards
Local = Callable[[Callable, tuple, Any], Callable]


def unsharded(fn: Callable, in_layouts: tuple, out_layout: Any) -> Callable:
  """The `Local` of one device: `fn` itself."""
  return fn


class Steps(NamedTuple):
  """The model and the caller, as a strategy's `run` sees them (built by the engine)."""
  step: Callable[[Carry, Array, Array], tuple[Carry, Array, Array]]
  # (carry, x (B, ...), pending (S, B, D)) -> (carry, conv inputs (S, B, D), output (B, ...))
  forward: Callable[[Array], Array]  # inputs (B, L, ...) -> outputs (B, L, ...), in parallel
  feed: Feed
  emit: Emit
  local: Local = unsharded  # on a mesh: runs channel-independent mixing on local shards


@runtime_checkable
class Strategy(Protocol):
  """A decoding strategy (see the module docstring). Implementations are frozen dataclasses:
  hashable, so that they are static arguments of the compiled programs."""

  name: ClassVar[str]         # the registry name
  exact: ClassVar[bool]       # reproduces the parallel forward to float32 accuracy
  needs_taps: ClassVar[bool]  # `prepare` needs the filters of every position (else tap 0)
  unbounded: ClassVar[bool]   # sequences may grow past the model's filter length

  @classmethod
  def check_aux(cls, aux: Any, model: Any) -> None:
    """Raises a ValueError unless `aux` (the strategy's extra inputs, e.g. distilled filters)
    fits the model; strategies without extra inputs require None."""

  def prefill_taps(self, tables: Tables, length: int) -> Array | None:
    """Filters (length, S, D) for the model's parallel prefill instead of its own (None: its
    own). An approximate strategy returns its own taps, so that the prefill and the steps
    compute one model."""

  def prepare(self, taps: Array, aux: Any = None) -> Tables:
    """Tables from the filter taps (T, S, D) (and `aux`, strategy-specific inputs)."""

  def init(self, tables: Tables, prompt: Array, prefill: Prefill, num_steps: int) -> State:
    """The state after the prompt (B, P, ...) and its `prefill`, for M = num_steps positions."""

  def run(self, tables: Tables, state: State, steps: Steps, carry: Carry, io: IO, start,
          count, num_steps: int) -> tuple[State, Carry, IO]:
    """Online positions start .. start + count - 1."""

  def table_layout(self, tables: Tables) -> Any:
    """Logical PartitionSpecs of `tables` (a prefix of its pytree)."""

  def state_layout(self, state: State) -> Any:
    """Logical PartitionSpecs of a state (a prefix of its pytree; `state` may be abstract)."""
