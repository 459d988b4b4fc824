"""Exact online strategies for the long convolutions: what each keeps and how it computes the
pending output `y[t] = sum_{s < t} a[s] * rho[t - s]` of every stream at every step.

All strategies share one interface, so the generation loop does not know which one runs:

  prepare(taps)                       -> tables (computed once per model, outside the loop)
  init(tables, prompt_inputs, M)      -> state  (after the parallel prefill of the prompt)
  pending(tables, state, r)           -> (S, B, D) contributions of all earlier positions
  record(tables, state, r, a)         -> state  (a: (S, B, D) inputs at online position r)
  run(tables, step, state, rest, M)   -> (state, rest)  (the token loop; flash adds its blocks)

Shapes: S streams (layers x convolutions per layer), B batch rows, D channels, P prompt
length, M online positions (absolute position of online position r is P + r), T = P + M.
The diagonal term a[t] * rho[0] is not part of `pending`: the model step adds it, since a[t]
is only known inside the step.

Every token loop reads the next position's pending outputs at the end of an iteration, after
all writes to the state, and carries them as a small array: a step that read them from the
large state buffers itself would let XLA fuse those reads into the writes of other buffers,
and, unable to order them, copy every buffer at every step (WORKSPACE.md, performance notes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax import blocks as blocks_lib
from lcsm_jax import convolution
from lcsm_jax import schedule

Array = jax.Array
Carry = Any
# step(rest, pending, r) -> (rest, inputs): one position of the model, given its pending outputs.
StepFn = Callable[[Carry, Array, Array], tuple[Carry, Array]]


DIRECT_PROMPT_MAX = 8  # prompts up to this length add their contribution without an FFT


def prompt_contribution(prompt_inputs: Array, taps: Array, num_steps: int) -> Array:
  """Contribution of the prompt's inputs to every online position, by one FFT per stream.

  Args:
    prompt_inputs: (P, S, B, D) long-convolution inputs of the prompt.
    taps: (>= P + M, S, D) filters.
    num_steps: M.
  Returns:
    (M, S, B, D): out[r] = sum_{s < P} prompt_inputs[s] * taps[P + r - s].
  """
  length, streams, batch, width = prompt_inputs.shape
  if length == 0 or num_steps == 0:
    return jnp.zeros((num_steps, streams, batch, width), jnp.float32)
  if length <= DIRECT_PROMPT_MAX:  # a few shifted products beat transforms of size P + M
    return prompt_products(prompt_inputs, taps, 0, num_steps)
  total = length + num_steps
  n = convolution.fft_length(total)
  x = jnp.fft.rfft(jnp.moveaxis(prompt_inputs.astype(jnp.float32), 0, -1), n=n)  # (S, B, D, F)
  h = jnp.fft.rfft(jnp.moveaxis(taps[:total].astype(jnp.float32), 0, -1), n=n)   # (S, D, F)
  y = jnp.fft.irfft(x * h[:, None], n=n)[..., length:total]
  return jnp.moveaxis(y, -1, 0)


def prompt_products(prompt_inputs: Array, taps: Array, start, rows: int) -> Array:
  """Rows [start, start + rows) of `prompt_contribution` by P shifted products (short prompts):
  (rows, S, B, D) float32. `start` may be traced."""
  length = prompt_inputs.shape[0]
  window = lambda s: lax.dynamic_slice_in_dim(taps, length + start - s, rows, axis=0)
  return sum(prompt_inputs[s].astype(jnp.float32) * window(s)[:, :, None, :].astype(jnp.float32)
             for s in range(length))


def _read_row(buffer: Array, r: Array) -> Array:
  return lax.dynamic_index_in_dim(buffer, r, axis=0, keepdims=False)


def _write_row(buffer: Array, r: Array, row: Array) -> Array:
  return lax.dynamic_update_index_in_dim(buffer, row.astype(buffer.dtype), r, axis=0)


def _add_rows(buffer: Array, start: Array, rows: Array) -> Array:
  current = lax.dynamic_slice_in_dim(buffer, start, rows.shape[0], axis=0)
  return lax.dynamic_update_slice_in_dim(buffer, current + rows.astype(buffer.dtype), start, axis=0)


def token_loop(step: StepFn, pending, update, state, rest, num_steps: int):
  """The shared token loop.

  Args:
    step: the model at one position (see `StepFn`).
    pending: (state, r) -> (S, B, D) pending outputs of online position r.
    update: (state, r, inputs) -> state after position r (record its inputs, add blocks...).
  Returns:
    (state, rest) after `num_steps` positions.
  """

  def body(r, carry):
    state, rest, pend = carry
    rest, inputs = step(rest, pend, r)
    state = update(state, r, inputs)
    return state, rest, pending(state, r + 1)

  if num_steps == 0:
    return state, rest
  state, rest, _ = lax.fori_loop(0, num_steps, body, (state, rest, pending(state, 0)))
  return state, rest


def _sum_rows(x: Array) -> Array:
  """x.sum(axis=0) for a power-of-two number of rows, as a tree of contiguous row-block adds:
  XLA on the CPU reduces the leading axis of a time-major buffer at under 1 GB/s, while these
  adds run at memory speed (measured in WORKSPACE.md)."""
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0]


# -- flash ---------------------------------------------------------------------------------


class FlashTables(NamedTuple):
  taps: Array                # (T, S, D)
  spectra: dict[int, Array]  # {U: (S, D, U + 1)} for the precomputed FFT block sizes


class FlashState(NamedTuple):
  """Rings of R = `schedule.ring_rows` rows; online position r lives in row r mod R."""

  inputs: Array          # (R, S, B, D) inputs of the last R online positions
  outputs: Array         # (R, S, B, D) pending block outputs of the next R positions
  prompt_inputs: Array   # (P, S, B, D) for 0 < P <= DIRECT_PROMPT_MAX (else 0 rows): the
                         # prompt's contribution is added at every step by P products
  prompt_outputs: Array  # (M, S, B, D) the prompt's contribution to every online position, for
                         # P > DIRECT_PROMPT_MAX (else 0 rows)


GROUP_BYTES = 1 << 27  # blocks whose input window is larger run in groups (see Flash)


@dataclasses.dataclass(frozen=True)
class Flash:
  """The tiled O(L log^2 L) schedule (see `schedule.py`).

  Attributes:
    blocks: how each block size is computed.
    group_bytes: blocks whose (U, S, B, D) float32 input window exceeds this run in groups of
      one stream and a power-of-two share of the channels (a window of at most this many bytes
      where D allows), so that their FFT temporaries stay a fraction of the state.
  """

  blocks: blocks_lib.BlockConfig
  group_bytes: int = GROUP_BYTES
  name: str = "flash"

  def prepare(self, taps: Array) -> FlashTables:
    return FlashTables(taps, blocks_lib.spectra_for(taps, self.blocks))

  def init(self, tables: FlashTables, prompt_inputs: Array, num_steps: int) -> FlashState:
    length, streams, batch, width = prompt_inputs.shape
    rows = schedule.ring_rows(schedule.FlashPlan(num_steps))
    zeros = lambda n: jnp.zeros((n, streams, batch, width), jnp.float32)
    if 0 < length <= DIRECT_PROMPT_MAX:
      prompt = (prompt_inputs.astype(jnp.float32), zeros(0))
    else:
      prompt = (zeros(0), prompt_contribution(prompt_inputs, tables.taps, num_steps))
    return FlashState(zeros(rows), zeros(rows), *prompt)

  def pending(self, tables: FlashTables, state: FlashState, r) -> Array:
    ring = state.outputs.shape[0]
    out = _read_row(state.outputs, r % ring)
    if state.prompt_outputs.shape[0]:
      out = out + _read_row(state.prompt_outputs, r)
    if state.prompt_inputs.shape[0]:
      out = out + prompt_products(state.prompt_inputs, tables.taps, r, 1)[0]
    return out

  def record(self, tables, state: FlashState, r, inputs: Array) -> FlashState:
    """Stores the inputs of position r and frees its (already read) pending-output row."""
    ring = state.inputs.shape[0]
    return state._replace(inputs=_write_row(state.inputs, r % ring, inputs),
                          outputs=_write_row(state.outputs, r % ring, jnp.zeros_like(inputs)))

  def block(self, tables: FlashTables, state: FlashState, level: int, end, out_len: int,
            trip=0):
    """Adds the block of size 2^level whose inputs end at online position `end`.

    trip: the index (always 0) of the 0-or-1-trip loop that runs the block. A block as large
    as the ring reads the whole ring, whatever `end`; its window is scaled by (1 + trip) = 1 so
    that it still depends on the loop and XLA cannot hoist its transforms out of it (which would
    run them at every token)."""
    size = 1 << level
    ring, streams, batch, width = state.inputs.shape
    first, target = (end - size) % ring, end % ring
    group_streams, chunk = self.group_shape(size, streams, batch, width)
    per_stream = width // chunk
    groups = (streams // group_streams) * per_stream

    def add_group(g, outputs):
      s, c = (g // per_stream) * group_streams, (g % per_stream) * chunk
      window = lax.dynamic_slice(state.inputs, (first, s, 0, c),
                                 (size, group_streams, batch, chunk))
      if size == ring:
        window = window * jnp.asarray(1 + trip, window.dtype)
      # sliced from the whole table here: a slice taken outside a group loop would be a copy
      taps = lax.dynamic_slice(tables.taps, (0, s, c),
                               (min(2 * size, tables.taps.shape[0]), group_streams, chunk))
      spectra = {size: lax.dynamic_slice(tables.spectra[size], (s, c, 0),
                                         (group_streams, chunk, size + 1))
                 } if size in tables.spectra else {}
      contribution = blocks_lib.apply_block(self.blocks, window, taps, spectra, out_len)
      current = lax.dynamic_slice(outputs, (target, s, 0, c),
                                  (out_len, group_streams, batch, chunk))
      return lax.dynamic_update_slice(outputs, current + contribution, (target, s, 0, c))

    if groups == 1:
      return state._replace(outputs=add_group(0, state.outputs))
    return state._replace(outputs=lax.fori_loop(0, groups, add_group, state.outputs))

  def group_shape(self, size: int, streams: int, batch: int, width: int) -> tuple[int, int]:
    """(streams, channels) of one group of a block of `size`: everything when its input window
    fits in `group_bytes`, else one stream and the widest power-of-two share of D that fits."""
    if size * streams * batch * width * 4 <= self.group_bytes:
      return streams, width
    chunk = width
    while chunk % 2 == 0 and size * batch * chunk * 4 > self.group_bytes:
      chunk //= 2
    return 1, chunk

  def update(self, tables: FlashTables, state: FlashState, r, inputs: Array,
             plan: schedule.FlashPlan) -> FlashState:
    """Records the inputs of position r, then adds every block whose inputs end at r + 1."""
    state = self.record(tables, state, r, inputs)
    i = r + 1
    for level in range(plan.num_levels):
      # A loop of zero or one trip per level; its body depends on the trip index j (always 0)
      # so that XLA cannot hoist the block out of the token loop.
      block = lambda j, s, level=level: self.block(tables, s, level, i + j,
                                                   plan.rows_written(level), j)
      state = lax.fori_loop(0, plan.runs_block(level, i).astype(jnp.int32), block, state)
    return state

  def run(self, tables: FlashTables, step: StepFn, state: FlashState, rest, num_steps: int):
    plan = schedule.FlashPlan(num_steps)
    return token_loop(step, lambda s, r: self.pending(tables, s, r),
                      lambda s, r, a: self.update(tables, s, r, a, plan), state, rest, num_steps)


# -- lazy ----------------------------------------------------------------------------------


class LazyTables(NamedTuple):
  reversed_taps: Array  # (T + chunk, S, D): reversed_taps[m] = taps[T - 1 - m], zeros for m >= T


class LazyState(NamedTuple):
  history: Array  # (T rounded up to a multiple of the chunk, S, B, D), prompt first
  offset: Array   # P, the absolute position of online position 0


@dataclasses.dataclass(frozen=True)
class Lazy:
  """Dot product over the stored history at every step: O(t) per step, reading only [0, t)
  in chunks of `chunk` positions."""

  chunk: int = 256
  name: str = "lazy"

  def __post_init__(self):
    if self.chunk < 1 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk must be a power of two, got {self.chunk}.")

  def prepare(self, taps: Array) -> LazyTables:
    pad = jnp.zeros((self.chunk,) + taps.shape[1:], jnp.float32)
    return LazyTables(jnp.concatenate([taps[::-1].astype(jnp.float32), pad]))

  def init(self, tables: LazyTables, prompt_inputs: Array, num_steps: int) -> LazyState:
    length, streams, batch, width = prompt_inputs.shape
    padded = -(-(length + num_steps) // self.chunk) * self.chunk
    history = jnp.zeros((padded, streams, batch, width), jnp.float32)
    history = lax.dynamic_update_slice_in_dim(history, prompt_inputs.astype(jnp.float32), 0, 0)
    return LazyState(history, jnp.asarray(length, jnp.int32))

  def pending(self, tables: LazyTables, state: LazyState, r) -> Array:
    total = tables.reversed_taps.shape[0] - self.chunk
    t = state.offset + r

    def add_chunk(c, acc):
      start = c * self.chunk
      a = lax.dynamic_slice_in_dim(state.history, start, self.chunk, axis=0)
      rho = lax.dynamic_slice_in_dim(tables.reversed_taps, total - 1 - t + start, self.chunk, 0)
      return acc + _sum_rows(a * rho[:, :, None, :])

    zeros = jnp.zeros(state.history.shape[1:], jnp.float32)
    return lax.fori_loop(0, (t + self.chunk - 1) // self.chunk, add_chunk, zeros)

  def record(self, tables, state: LazyState, r, inputs: Array) -> LazyState:
    return state._replace(history=_write_row(state.history, state.offset + r, inputs))

  def run(self, tables, step: StepFn, state: LazyState, rest, num_steps: int):
    return token_loop(step, lambda s, r: self.pending(tables, s, r),
                      lambda s, r, a: self.record(tables, s, r, a), state, rest, num_steps)


# -- eager ---------------------------------------------------------------------------------


class EagerTables(NamedTuple):
  taps: Array  # (T + chunk, S, D), zero-padded


class EagerState(NamedTuple):
  outputs: Array  # (M rounded up to a chunk, plus one chunk, S, B, D) pending outputs


@dataclasses.dataclass(frozen=True)
class Eager:
  """Each new input pushes its contribution into every later output: O(M - r) per step, in
  chunks of `chunk` positions."""

  chunk: int = 256
  name: str = "eager"

  def prepare(self, taps: Array) -> EagerTables:
    pad = jnp.zeros((self.chunk,) + taps.shape[1:], jnp.float32)
    return EagerTables(jnp.concatenate([taps.astype(jnp.float32), pad]))

  def init(self, tables: EagerTables, prompt_inputs: Array, num_steps: int) -> EagerState:
    contribution = prompt_contribution(prompt_inputs, tables.taps, num_steps)
    padded = (-(-num_steps // self.chunk) + 1) * self.chunk
    outputs = jnp.zeros((padded,) + contribution.shape[1:], jnp.float32)
    return EagerState(lax.dynamic_update_slice_in_dim(outputs, contribution, 0, 0))

  def pending(self, tables, state: EagerState, r) -> Array:
    return _read_row(state.outputs, r)

  def record(self, tables: EagerTables, state: EagerState, r, inputs: Array,
             num_steps: int) -> EagerState:
    a = inputs.astype(jnp.float32)

    def push_chunk(c, outputs):
      start = c * self.chunk
      rho = lax.dynamic_slice_in_dim(tables.taps, 1 + start, self.chunk, axis=0)
      return _add_rows(outputs, r + 1 + start, a[None] * rho[:, :, None, :])

    trips = (num_steps - 1 - r + self.chunk - 1) // self.chunk
    return EagerState(lax.fori_loop(0, trips, push_chunk, state.outputs))

  def run(self, tables, step: StepFn, state: EagerState, rest, num_steps: int):
    return token_loop(step, lambda s, r: self.pending(tables, s, r),
                      lambda s, r, a: self.record(tables, s, r, a, num_steps), state, rest,
                      num_steps)


STRATEGIES = ("flash", "lazy", "eager")
