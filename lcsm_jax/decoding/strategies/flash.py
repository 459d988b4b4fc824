"""'flash': the Flash Inference tiling in base b, O(L log^2 L) (see `decoding/schedule.py`).

After the step at online position r, with i = r + 1, every level k whose block size U = b^k
divides i (and whose group does not start at i) has an event: its input block [i - U, i) has
completed and its output block [i, i + U) starts. Small levels compute the block's outputs
directly from the group's inputs (the rectangle [group start, i) x [i, i + U)); FFT levels
transform the completed input block once (a 2U-point FFT), multiply it by the precomputed
spectra of the filter windows of every later block of its group, file those products in
frequency-domain accumulators, and inverse-transform the output block [i, i + U) once, with
every product filed for it. Base 2 is the paper's binary tiling (no accumulators). All
streams, batch rows and channels of an event are one batched computation. (Blocks up to
`blocks.MATMUL_DFT_MAX` transform by products with the DFT matrices instead of FFTs.)

With `EngineOptions.smooth`, the FFT levels above SMOOTHED_ABOVE positions (or above
`smooth`) follow the smoothed schedule (`schedule.smoothed_events`): the bridge level (the
largest FFT level up to that size, or the smallest FFT level) adds the squares of its output
block with the newest input block at the block's start (`bridge_event`) and those with the
up to 2b - 2 older ones a block early (`bridge_older`), and every larger level's output
block, due a block after its inputs complete, is computed in chunks of streams and channels
spread over the steps before it (`spread_chunk`, `smoothed_block`). The levels below the
bridge level are the plain tiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding import prompt as prompt_lib
from lcsm_jax.decoding import schedule
from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.models.interface import Prefill
from lcsm_jax.tuning import crossover as crossover_lib

Array = jax.Array

BINARY_SPECTRA_MAX = 1 << 15  # spectra_max_size='auto' with base 2
DIRECT_TAPS_MAX = 4096  # `prepare` lays out the taps of direct levels with windows up to this
SPREAD_UNIT = 32  # smoothed: a level above the bridge runs at most one chunk of a block per
                  # this many positions, or per bridge block if smaller (16K, 8 x 256, base 4,
                  # one core: with bridge 64, units 64 / 32 / 16 cost 1.113 / 1.116 / 1.147x
                  # the plain total, and 32 lowers the largest chunk from 2.3 to ~1 ms;
                  # WORKSPACE.md)
PADDED_WINDOW_MAX_BYTES = 1 << 24  # smoothed levels keep a zero-padded transform input of at
                                   # most this size in the state (`FlashState.padded_windows`)
STATIC_ENDS_MAX = 64  # direct levels with at most this many blocks in a tile run one static
                     # branch per event position (`Flash.staged_event`)
SMOOTHED_ABOVE = 16  # smooth=True spreads the FFT levels larger than this: at 16K (8 x 256,
                     # base 4) the bridge level's events then stay within 5x the median token
                     # (above 64: 11.5x; WORKSPACE.md)


def _add_at(buffer: Array, values: Array, start) -> Array:
  """`buffer` with `values` added into its block at `start` (in place under jit)."""
  current = lax.dynamic_slice(buffer, start, values.shape)
  return lax.dynamic_update_slice(buffer, current + values, start)


class FlashTables(NamedTuple):
  taps: Array                # (T, S, D)
  spectra: dict[int, Array]  # {U: (distances, S, D, U + 1)} spectra of the filter windows
                             # taps[(d - 1)U : (d + 1)U] of the precomputed FFT levels
  direct_taps: Array | None = None  # (2H, S, D): H zeros, then taps[:H], time-major; H
                             # covers the direct levels' windows (see `_direct_taps`)


class FlashState(NamedTuple):
  """Inputs and pending outputs of the online positions, in two tiers (see `Flash.layout`).

  The levels of at least `tile` positions (FFT levels) read and write channel-major rings
  (time on the last axis, the layout of the transforms: with time-major rings, the
  transposes around every transform cost more than the transform) of R =
  `schedule.ring_rows` positions. The steps and the smaller levels use time-major staging
  buffers of the current tile: a step writes and reads one contiguous row, and the direct
  levels' products run over contiguous rows of all channels (on channel-major staging, rows
  of T floats, XLA:CPU's loops ran them 3-4x slower). Once per tile the tile's inputs go to
  the ring (transposed) and the ring levels' outputs for the next tile come out into
  `tile_outputs` (channel-major). Online position r lives at r mod R in the rings and at
  r mod T in the staging buffers.
  """

  inputs: Array          # (S, B, D, R) inputs of the last R online positions (R = 0 when no
                         # level runs on the rings)
  outputs: Array         # (S, B, D, R) pending outputs of the next R positions
  staged_inputs: Array   # (T, S, B, D) inputs of the current tile (or of the last T positions)
  staged_outputs: Array  # (T, S, B, D) pending outputs of the current tile from the levels
                         # below the tile (every level without ring levels)
  tile_outputs: Array    # (S, B, D, T') pending outputs of the current tile from the ring
                         # levels (T' = T, or 0 without ring levels)
  prompt_inputs: Array   # (P, S, B, D) for 0 < P <= DIRECT_PROMPT_MAX (else 0 rows): the
                         # prompt's contribution is added at every step by P products
  prompt_outputs: Array  # (M, S, B, D) the prompt's contribution to every online position, for
                         # P > DIRECT_PROMPT_MAX (else 0 rows)
  input_spectra: dict[int, Array] = {}  # {U: (distances - 1, S, B, D, U + 1) complex64}:
                         # per ring level with base > 2, the spectra of the current group's
                         # completed input blocks q = 0 .. distances - 2 (slot q)
  padded_windows: dict[int, Array] = {}  # {U: (S', B, D', 2U) float32} per smoothed FFT level:
                         # the forward transform's input for one chunk (or group) of its
                         # streams and channels (`smoothed_shape`), the input block then U
                         # zeros; only the first half is ever written. A window zero-padded
                         # afresh (an XLA pad fusion) cost 1.6x the copy into this buffer
  bridge_products: dict[int, Array] = {}  # {U: (S, B, D, U + 1) complex64} at the bridge level
                         # (`Flash.bridge_phase`): the products of its next output block's
                         # older input blocks, added a block early (`bridge_older`)


class Layout(NamedTuple):
  """The static shape of one plan's state (`Flash.layout`)."""
  plan: schedule.FlashPlan
  blocks: blocks_lib.BlockConfig
  tile: int | None   # smallest ring level (every level from it up runs by FFT on the rings);
                     # None: every level runs on the staging rows
  ring: int          # R, positions of the rings (0 without ring levels)
  staged: int        # rows of the staging buffers
  bridge: int | None = None  # smoothed: the bridge level's block size (the levels from it
                             # up follow the smoothed schedule); None: plain tiling

  def smoothed(self, level: int) -> bool:
    return self.bridge is not None and self.plan.size(level) >= self.bridge

  def on_ring(self, level: int) -> bool:
    return self.tile is not None and self.plan.size(level) >= self.tile


@dataclasses.dataclass(frozen=True)
class Flash(base.MixingStrategy):
  """The tiled schedule.

  Attributes:
    options: the engine's options (tau, base, layer_parallel, precomputed_spectra,
      spectra_max_size, group_bytes are flash's).
    crossover: the widest direct rectangle that beat the FFT on this machine, which resolves
      tau='auto' (`lcsm_jax.tuning.engine_tau.crossover`: the binary blocks' crossover, or
      for bases above 2 and long sessions, measured by timing this engine; None: not
      resolved, allowed for `prepare`, which then keeps spectra for every size).
    pallas_max: on accelerators with a measured table, the Pallas kernel for blocks up to this
      size under tau='auto'.
  """

  name: ClassVar[str] = "flash"
  exact: ClassVar[bool] = True
  supplies_filters: ClassVar[bool] = True

  options: EngineOptions = EngineOptions()
  crossover: int | None = None
  pallas_max: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "options", self.options.resolved())  # smooth='auto' decided

  @classmethod
  def from_options(cls, options: EngineOptions, crossover: int | None = None,
                   pallas_max: int | None = None) -> "Flash":
    if options.tau != "auto":
      crossover = pallas_max = None
    return cls(options, crossover, pallas_max)

  @property
  def tau(self):
    """The resolved tau: `options.tau`, or for 'auto' ('auto' while unresolved) the largest
    block size that runs directly for the crossover (`crossover.direct_limit`: a direct event
    of base b reads b - 1 blocks, so levels run directly up to the largest U = b^k with
    (b - 1) U <= crossover)."""
    if self.options.tau == "auto" and self.crossover is not None:
      return crossover_lib.direct_limit(self.options.base, self.crossover)
    return self.options.tau

  @classmethod
  def needs_crossover(cls, options: EngineOptions) -> bool:
    return options.tau == "auto"

  def plan(self, num_steps: int) -> schedule.FlashPlan:
    return schedule.FlashPlan(num_steps, self.options.base)

  def block_config(self, num_steps: int) -> blocks_lib.BlockConfig:
    return blocks_lib.block_config(self.plan(num_steps).block_sizes, self.tau,
                                   pallas_max=self.pallas_max,
                                   layer_parallel=self.options.layer_parallel)

  def spectrum_sizes(self, length: int) -> list[int]:
    """Block sizes whose filter spectra `prepare` computes: every size a plan within `length`
    positions uses that may run by FFT (with tau='auto', every size) up to spectra_max_size."""
    if not self.options.precomputed_spectra:
      return []
    limit = self.options.spectra_max_size
    if limit == "auto":
      limit = BINARY_SPECTRA_MAX if self.options.base == 2 else None
    sizes = [s for s in self.plan(length).block_sizes if limit is None or s <= limit]
    if self.tau == "auto":
      return sizes
    return [s for s in sizes if blocks_lib.method_for(s, self.tau, self.pallas_max) == "fft"]

  def prepare(self, taps: Array, aux: Any = None) -> FlashTables:
    # A plan of M <= T steps uses a subset of these levels, and at most these distances.
    plan = self.plan(taps.shape[0])
    levels = {plan.size(k): k for k in range(plan.num_levels)}
    distances = lambda k: max(plan.distances(k), schedule.smoothed_distances(plan, k)
                              if self.options.smooth else 0)
    spectra = {size: blocks_lib.window_spectra(taps, size, distances(levels[size]))
               for size in self.spectrum_sizes(taps.shape[0])}
    return FlashTables(taps, spectra, self._direct_taps_table(taps))

  def prefill_taps(self, tables: FlashTables, length: int) -> Array:
    # the model's filters as prepare received them: the model's own parameters for them can go.
    # All of them: models read the first `length` (a slice here was a copy: 8 GiB at 2^20)
    return tables.taps

  def _direct_taps_table(self, taps: Array) -> Array:
    """The first H taps after H zeros: (2H, S, D), H the largest window
    (rows + U, at most DIRECT_TAPS_MAX) of the direct levels of a plan of T steps. With tau
    'auto' unresolved (a session's tables serve every batch size, each with its own
    crossover), those of the largest tau it may resolve to. Made here: made in the token loop,
    XLA computed it at every call (0.4 ms of a one-token call at 16K, 8 x 256)."""
    flash = self
    if self.tau == "auto":
      flash = dataclasses.replace(self, crossover=crossover_lib.MAX_DIRECT_SIZE)
    head = flash._direct_head(taps.shape[0]) if flash.tau != "auto" else 0
    return self._padded_head(taps, head)

  def _direct_head(self, num_steps: int) -> int:
    """H of `FlashTables.direct_taps` for a plan of `num_steps` steps at the resolved tau: the
    largest window (rows + U) of its direct levels, at most DIRECT_TAPS_MAX."""
    plan, config = self.plan(num_steps), self.block_config(num_steps)
    windows = [plan.direct_window(k) + plan.size(k) for k in range(plan.num_levels)
               if config.method(plan.size(k)) == "direct"]
    return max([w for w in windows if w <= DIRECT_TAPS_MAX], default=0)

  def loop_tables(self, tables: FlashTables, num_steps: int) -> FlashTables:
    """The tables as the token loop of `num_steps` steps reads them: the direct taps cut to
    this plan's head (tables made before tau='auto' was resolved hold those of the largest
    tau). A copy of the head's rows, made once per call outside the loop: read inside it from
    the whole table, every direct event's taps were a scattered read (rows of 2H floats), 9%
    of the 16K run of the 8 x 256 stack (tau 4, H 16 in a table of H 256)."""
    table = tables.direct_taps
    if table is None or self.tau == "auto":
      return tables
    head, need = table.shape[0] // 2, self._direct_head(num_steps)
    if need >= head:
      return tables
    return tables._replace(direct_taps=table[head - need:head + need])

  @staticmethod
  def _padded_head(taps: Array, head: int) -> Array:
    """taps (T, S, D) -> (2 head, S, D) float32: `head` zeros, then taps[:head] (zero past
    T)."""
    window = jnp.pad(taps[:head], [(head, head - min(head, taps.shape[0]))] + [(0, 0)] * 2)
    return window.astype(jnp.float32)

  def table_layout(self, tables: FlashTables) -> FlashTables:
    return FlashTables(sharding.TAPS,
                       {size: sharding.WINDOW_SPECTRA for size in tables.spectra},
                       sharding.TAPS)

  def state_layout(self, state: FlashState) -> FlashState:
    return FlashState(sharding.STATES, sharding.STATES, sharding.TIME_MAJOR,
                      sharding.TIME_MAJOR, sharding.STATES, sharding.TIME_MAJOR,
                      sharding.TIME_MAJOR,
                      {size: sharding.TIME_MAJOR for size in state.input_spectra},
                      {size: sharding.STATES for size in state.padded_windows},
                      {size: sharding.STATES for size in state.bridge_products})

  def layout(self, num_steps: int) -> Layout:
    """Which levels run on the rings: the largest ones that all run by FFT."""
    plan, blocks = self.plan(num_steps), self.block_config(num_steps)
    tile = None
    for level in reversed(range(plan.num_levels)):
      if blocks.method(plan.size(level)) != "fft":
        break
      tile = plan.size(level)
    if tile is None:
      top_direct = plan.num_levels > 0
      return Layout(plan, blocks, None, 0, schedule.ring_rows(plan, top_direct))
    top = plan.size(plan.num_levels - 1)
    above = SMOOTHED_ABOVE if self.options.smooth is True else self.options.smooth
    bridge = max(plan.size(k) for k in range(plan.num_levels)
                 if tile <= plan.size(k) <= max(tile, above))
    if not self.options.smooth or bridge == top:
      return Layout(plan, blocks, tile, schedule.ring_rows(plan), tile)
    # smoothed: an output block is written a block ahead and its newest input block read a
    # block late, so the rings hold twice the largest block
    return Layout(plan, blocks, tile, 2 * schedule.ring_rows(plan), tile, bridge)

  def spectrum_slots(self, layout: Layout, level: int) -> int:
    """Input-block spectra a ring level keeps: the group's completed blocks but the last
    (b - 2), or smoothed, the blocks of its group and the one before (2b; block S in slot
    S mod slots), or when fewer blocks feed a later one (S <= blocks - 1 - delay, delay 1 at
    the bridge level, 2 above it), one slot each (the top level: b - 2)."""
    plan = layout.plan
    if layout.smoothed(level):
      delay = 1 if plan.size(level) == layout.bridge else 2
      return max(min(2 * plan.base, -(-plan.num_steps // plan.size(level)) - delay), 1)
    return plan.distances(level) - 1

  def init(self, tables: FlashTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> FlashState:
    length, streams, batch, width = prefill.conv_inputs.shape
    layout = self.layout(num_steps)
    plan = layout.plan
    zeros = lambda n: jnp.zeros((n, streams, batch, width), jnp.float32)
    channel_major = lambda n: jnp.zeros((streams, batch, width, n), jnp.float32)
    if 0 < length <= prompt_lib.DIRECT_PROMPT_MAX:
      prompt_state = (prefill.conv_inputs.astype(jnp.float32), zeros(0))
    else:
      prompt_state = (zeros(0), prompt_lib.prompt_contribution(prefill.conv_inputs,
                                                                tables.taps, num_steps))
    input_spectra = {
        plan.size(k): jnp.zeros((self.spectrum_slots(layout, k), streams, batch, width,
                                 plan.size(k) + 1), jnp.complex64)
        for k in range(plan.num_levels)
        if layout.on_ring(k) and self.spectrum_slots(layout, k) > 0}
    padded_shapes = {plan.size(k): self.smoothed_shape(layout, k, streams, batch, width)
                     + (2 * plan.size(k),)
                     for k in range(plan.num_levels) if layout.smoothed(k)}
    padded_windows = {size: jnp.zeros(shape, jnp.float32)
                      for size, shape in padded_shapes.items()
                      if 4 * math.prod(shape) <= PADDED_WINDOW_MAX_BYTES
                      and not blocks_lib.transforms_by_matmul(size)}
    bridge_products = {}
    if self.bridge_phase(layout) is not None:
      bridge_products[layout.bridge] = jnp.zeros((streams, batch, width, layout.bridge + 1),
                                                 jnp.complex64)
    return FlashState(channel_major(layout.ring), channel_major(layout.ring),
                      zeros(layout.staged), zeros(layout.staged),
                      channel_major(layout.staged if layout.tile else 0), *prompt_state,
                      input_spectra, padded_windows, bridge_products)

  def smoothed_shape(self, layout: Layout, level: int, streams: int, batch: int, width: int
                     ) -> tuple[int, int, int]:
    """(S', B, D') of the streams and channels a smoothed level transforms at once: a chunk
    (`smooth_chunks`) above the bridge level, a group of its event (`group_shape`) at it."""
    size = layout.plan.size(level)
    if size > layout.bridge:
      group_streams, chunk, _ = self.smooth_chunks(size // self.spread_unit(layout), streams,
                                                   batch, width)
    else:
      group_streams, chunk = self.group_shape(size, streams, batch, width)
    return group_streams, batch, chunk

  def pending(self, tables: FlashTables, state: FlashState, r) -> Array:
    staged = state.staged_outputs.shape[0]
    out = lax.dynamic_index_in_dim(state.staged_outputs, r % staged, axis=0, keepdims=False)
    if state.tile_outputs.shape[-1]:
      out = out + lax.dynamic_index_in_dim(state.tile_outputs, r % staged, axis=3,
                                           keepdims=False)
    if state.prompt_outputs.shape[0]:
      out = out + base.read_row(state.prompt_outputs, r)
    if state.prompt_inputs.shape[0]:
      out = out + prompt_lib.prompt_products(state.prompt_inputs, tables.taps, r, 1)[0]
    return out

  def update(self, tables: FlashTables, state: FlashState, r, inputs: Array,
             num_steps: int) -> FlashState:
    """Smoothed: first runs the spread chunks due after position r - 1 (`spread_work`). Then
    records the inputs of position r, frees its (already read) pending-output row, and runs
    every level's event after r (whose inputs end at r + 1); at the end of a tile, moves the
    tile's inputs to the rings, runs the ring levels' events and stages the next tile's
    pending outputs."""
    layout = self.layout(num_steps)
    plan = layout.plan
    state = self.spread_work(layout, tables, state, r)
    row = lambda buffer, values: lax.dynamic_update_index_in_dim(
        buffer, values.astype(buffer.dtype), r % layout.staged, axis=0)
    state = state._replace(staged_inputs=row(state.staged_inputs, inputs),
                           staged_outputs=row(state.staged_outputs, jnp.zeros_like(inputs)))
    i = r + 1
    # Loops of zero or one trip; their bodies depend on the trip index j (always 0) so that
    # XLA cannot hoist the work out of the token loop.
    for level in range(plan.num_levels):
      if not layout.on_ring(level):
        event = lambda j, s, level=level: self.staged_event(layout, tables, s, level, i + j, j)
        state = lax.fori_loop(0, plan.runs_block(level, i).astype(jnp.int32), event, state)
    if layout.tile is not None:
      boundary = (i % layout.tile == 0) & (i < num_steps)
      state = lax.fori_loop(0, boundary.astype(jnp.int32),
                            lambda j, s: self.tile_end(layout, tables, s, i + j, j), state)
    return state

  def tile_end(self, layout: Layout, tables: FlashTables, state: FlashState, end,
               trip) -> FlashState:
    """After the tile that ends at online position `end`: its inputs go to the rings, the
    ring columns staged a tile ago are cleared, the ring levels' events run, and their
    pending outputs of the next tile are staged in `tile_outputs`; a plain ring level of the
    tile's size runs last, on the staging buffers (`ring_event(staged=True)`). (Clearing
    after the staging read instead made XLA copy the ring, unable to order the read before
    the write.)"""
    plan, tile, ring = layout.plan, layout.tile, layout.ring
    state = state._replace(
        inputs=lax.dynamic_update_slice_in_dim(
            state.inputs, self._tile_inputs(state, trip), (end - tile) % ring, axis=3),
        outputs=lax.dynamic_update_slice_in_dim(
            state.outputs, jnp.zeros(state.outputs.shape[:3] + (tile,), jnp.float32),
            (end - tile) % ring, axis=3))
    staged_levels = []
    for level in range(plan.num_levels):
      if layout.smoothed(level) and plan.size(level) == layout.bridge:
        state = self.bridge_event(layout, tables, state, level, end)
      elif layout.on_ring(level) and not layout.smoothed(level):
        if plan.size(level) == layout.staged:
          staged_levels.append(level)
          continue
        event = lambda j, s, level=level: self.ring_event(layout, tables, s, level, end + j, j)
        state = lax.fori_loop(0, plan.runs_block(level, end).astype(jnp.int32), event, state)
    state = state._replace(
        tile_outputs=lax.dynamic_slice_in_dim(state.outputs, end % ring, tile, axis=3))
    # its output block is the next tile, which nothing reads from the ring after the staging
    for level in staged_levels:
      event = lambda j, s, level=level: self.ring_event(layout, tables, s, level, end + j, j,
                                                        staged=True)
      state = lax.fori_loop(0, plan.runs_block(level, end).astype(jnp.int32), event, state)
    return state

  @staticmethod
  def _channels(state: FlashState) -> tuple[int, int, int]:
    """(S, B, D) of the state's streams, batch rows and channels."""
    return state.staged_inputs.shape[1:]

  @staticmethod
  def _tile_inputs(state: FlashState, trip) -> Array:
    """The staging buffer's inputs channel-major, (S, B, D, T), as the ring levels read them.
    Scaled by 1 + trip (trip is the index, always 0, of the 0-or-1-trip loop of a tile end):
    the whole buffer is read whatever the position, and without a dependence on the loop XLA
    hoists the transforms of the reading events out of it (see `ring_event`)."""
    return jnp.moveaxis(state.staged_inputs, 0, -1) * jnp.asarray(1 + trip, jnp.float32)

  def _groups(self, rows: int, shape: tuple[int, int, int], compute, state: FlashState):
    """Runs compute(state, s, c, (S', B, D')) over the groups of streams and channels of an
    event reading `rows` input rows (`group_shape`)."""
    streams, batch, width = shape
    group_streams, chunk = self.group_shape(rows, streams, batch, width)
    per_stream = width // chunk
    groups = (streams // group_streams) * per_stream

    def run_group(g, state):
      s, c = (g // per_stream) * group_streams, (g % per_stream) * chunk
      return compute(state, s, c, (group_streams, batch, chunk))

    if groups == 1:
      return run_group(0, state)
    return lax.fori_loop(0, groups, run_group, state)

  def staged_event(self, layout: Layout, tables: FlashTables, state: FlashState, level: int,
                   end, trip=0) -> FlashState:
    """The event of a level below the tile, on the time-major staging rows: adds the
    contribution of the group's completed input blocks to the outputs [end, end + U).

    A direct level with few event positions in a tile (`static_ends`) runs one branch per
    position (`lax.switch`), each with static offsets: XLA:CPU computed dynamic offsets of
    the staging rows element by element (a direct event of 12 x 4 rows of 2048 channels:
    6 us static, 40-60 us at a dynamic offset, by slice or gather alike)."""
    plan = layout.plan
    size, slot = plan.size(level), plan.slot(level, end)
    method = layout.blocks.method(size)
    rows = plan.direct_window(level) if method == "direct" else size
    staged = layout.staged
    out_len = plan.rows_written(level)
    ends = self.static_ends(layout, level) if method == "direct" else None

    def at_static_end(e, state, s, c, shape):  # the event whose block starts at e mod tile
      reach = (e // size) % plan.base * size
      window = lax.dynamic_slice(state.staged_inputs, (e - reach, s, 0, c), (reach,) + shape)
      out = blocks_lib.direct_block(
          window, self._direct_taps(tables, reach, size, reach, s, c, shape), out_len)
      return state._replace(staged_outputs=_add_at(state.staged_outputs, out, (e, s, 0, c)))

    def compute(state, s, c, shape):
      if ends is not None:
        m = end % staged // size  # the block's index in the tile, not a multiple of b
        return lax.switch(m - m // plan.base - 1,
                          [lambda st, e=e: at_static_end(e, st, s, c, shape) for e in ends],
                          state)

      def read(first, count):  # (count, S', B, D')
        # a gather of whole rows: XLA:CPU ran the same dynamic slice (time on the major axis)
        # element by element, 6x slower
        window = jnp.take(state.staged_inputs, (first + jnp.arange(count)) % staged, axis=0)
        window = lax.dynamic_slice(window, (0, s, 0, c), (count,) + shape)
        if count == staged:
          window = window * jnp.asarray(1 + trip, window.dtype)
        return window

      if method == "direct":  # the rectangle [group start, end) x [end, end + rows)
        reach = slot * size  # inputs of the group completed so far
        window = read(end - reach, rows)
        if rows > size:  # base > 2: the group's later rows are not inputs yet
          window = jnp.where((jnp.arange(rows) < reach)[:, None, None, None], window, 0)
        out = blocks_lib.direct_block(
            window, self._direct_taps(tables, rows, size, reach, s, c, shape), out_len)
      else:  # the squares (q, slot), q < slot, one at a time
        def square(q, out):
          window = read(end - (slot - q) * size, size)
          taps = self._taps(tables, (slot - q - 1) * size, 2 * size, s, c, shape)
          if method == "pallas":
            return out + blocks_lib.pallas_block(window, taps[:, :, 0, :], out_len).astype(
                jnp.float32)
          return out + blocks_lib.fft_block(
              window, blocks_lib.filter_spectrum(taps[:, :, 0, :], size)[:, None], out_len)
        out = lax.fori_loop(0, slot, square, jnp.zeros((out_len,) + shape, jnp.float32))
      return state._replace(staged_outputs=_add_at(state.staged_outputs, out,
                                                   (end % staged, s, 0, c)))

    return self._groups(rows, self._channels(state), compute, state)

  @staticmethod
  def static_ends(layout: Layout, level: int) -> list[int] | None:
    """The starts e (mod tile) of the output blocks of a level below the tile, in order (the
    multiples of U in the tile but those of bU), when the staging buffer is the tile and they
    are at most STATIC_ENDS_MAX; else None."""
    plan, size = layout.plan, layout.plan.size(level)
    if layout.tile is None or layout.staged // size > STATIC_ENDS_MAX:
      return None
    return [e for e in range(size, layout.staged, size) if e // size % plan.base]

  def ring_event(self, layout: Layout, tables: FlashTables, state: FlashState, level: int,
                 end, trip=0, staged: bool = False) -> FlashState:
    """The event of a ring level (FFT), whose input block ends at online position `end`:
    transforms the completed input block once, keeps its spectrum for the later blocks of
    its group, and adds to the outputs [end, end + U) the inverse transform of the products
    of every completed input block of the group with its filter window.

    staged: a level of the tile's size, run after the staging: its input block is the tile
    just completed, read from the staging buffer, and its output block the next tile, added
    into `tile_outputs` (on the rings they are one piece of U floats per stream and channel:
    1-4% of the whole 16K run of the 8 x 256 stack at tau=4, measured side by side).

    trip: the index (always 0) of the 0-or-1-trip loop that runs the event. A window as large
    as the ring reads the whole ring, whatever `end`; it is scaled by (1 + trip) = 1 so that it
    still depends on the loop and XLA cannot hoist its transforms out of it (which would run
    them at every token)."""
    plan, ring = layout.plan, layout.ring
    size, slot, distances = plan.size(level), plan.slot(level, end), plan.distances(level)

    def compute(state, s, c, shape):
      if staged:  # the tile just completed: the whole staging buffer, as in the ring's case
        window = lax.dynamic_slice(self._tile_inputs(state, trip), (s, 0, c, 0),
                                   shape + (size,))
      else:
        window = lax.dynamic_slice(state.inputs, (s, 0, c, (end - size) % ring),
                                   shape + (size,))
      if size == ring and not staged:
        window = window * jnp.asarray(1 + trip, window.dtype)
      x = blocks_lib.input_spectrum(window)  # (S', B, D', U + 1)

      window_spectrum = lambda d: self._window_spectrum(tables, size, d, s, c, shape)
      at = lambda q: (q, s, 0, c, 0)
      slot_shape = (1,) + shape + (size + 1,)

      def squares(slot_value, x, spectra=None):  # input blocks q < slot_value of the group
        product = x * window_spectrum(1)  # (the newest, q = slot - 1, is x)
        for q in range(slot_value - 1):
          earlier = lax.dynamic_slice(spectra, at(q), slot_shape)[0]
          product = product + earlier * window_spectrum(slot_value - q)
        return product

      if distances == 1:
        product = squares(1, x)
      else:
        # Slot q holds the spectrum of the group's input block q (q <= distances - 2: the
        # last input block of a group feeds no later block). It is written first, then read
        # by the branch of this slot, which leaves the slots in place (updating per-output
        # accumulators instead made XLA copy them at every event). One branch per slot: each
        # reads only the spectra it uses, at static offsets, in one pass (all slots masked
        # read every slot; a loop over them wrote the product at every trip).
        spectra = state.input_spectra[size]
        keep = jnp.minimum(slot - 1, distances - 2)
        kept = lax.dynamic_slice(spectra, at(keep), slot_shape)
        spectra = lax.dynamic_update_slice(spectra, jnp.where(slot < distances, x[None], kept),
                                           at(keep))
        product = lax.switch(slot - 1, [lambda x, v=v: squares(v, x, spectra)
                                        for v in range(1, distances + 1)], x)
        state = state._replace(input_spectra={**state.input_spectra, size: spectra})
      out = blocks_lib.outputs_from_spectrum(product, plan.rows_written(level))
      if staged:
        return state._replace(tile_outputs=_add_at(state.tile_outputs, out, (s, 0, c, 0)))
      return state._replace(outputs=_add_at(state.outputs, out, (s, 0, c, end % ring)))

    return self._groups(size, self._channels(state), compute, state)

  def spread_work(self, layout: Layout, tables: FlashTables, state: FlashState, i
                  ) -> FlashState:
    """The chunks of the levels above the bridge due after the step i - 1 (`spread_chunk`).
    `update` of position i runs them first: they read and write only the rings and the kept
    spectra, not what the step at i reads or makes, so they do not wait for it (and XLA may
    run them beside it)."""
    levels = self.spread_levels(layout)
    if not levels:
      return state
    phases = jnp.asarray([self.spread_phase(layout, level) for level in levels])
    bridge_phase = self.bridge_phase(layout)

    def spread(trip, state):
      if bridge_phase is not None:
        state = self.bridge_older(layout, tables, state, i + trip)
      for level in levels:
        state = self.spread_chunk(layout, tables, state, level, i + trip)
      return state

    # one guard for all levels (a loop of zero trips still costs microseconds)
    due = jnp.any(i % self.spread_unit(layout) == phases)
    if bridge_phase is not None:
      due = due | (i % layout.bridge == bridge_phase)
    return lax.fori_loop(0, due.astype(jnp.int32), spread, state)

  def bridge_event(self, layout: Layout, tables: FlashTables, state: FlashState, level: int,
                   end) -> FlashState:
    """The bridge level's work at the tile end `end`: the output block starting at `end`, if
    one does, whole, from its input blocks up to the one just completed."""
    size = layout.plan.size(level)

    def run_block(trip, state):
      def compute(st, s, c, group):
        older = st.bridge_products.get(size)
        if older is not None:  # added a block early (`bridge_older`)
          older = lax.dynamic_slice(older, (s, 0, c, 0), group + (size + 1,))
        newest = None
        if size == layout.staged:  # the block just completed is the staging buffer: read it
          # there (contiguous) rather than from the ring (U-float pieces of long rows, which
          # XLA copied at ~2 ns a float)
          newest = lax.dynamic_slice(self._tile_inputs(st, trip), (s, 0, c, 0),
                                     group + (size,))
        return self.smoothed_block(layout, tables, st, level, end // size + trip, 1, s, c,
                                   group, newest, older)
      return self._groups(size, self._channels(state), compute, state)

    return lax.fori_loop(0, (end % size == 0).astype(jnp.int32), run_block, state)

  @staticmethod
  def spread_levels(layout: Layout) -> list[int]:
    """The levels above the bridge level (their blocks are spread over steps)."""
    plan = layout.plan
    return [k for k in range(plan.num_levels)
            if layout.smoothed(k) and plan.size(k) > layout.bridge]

  @classmethod
  def spread_unit(cls, layout: Layout) -> int:
    """Positions per chunk slot of the levels above the bridge (a block of U spreads its chunks
    over U / unit slots, one each at most): SPREAD_UNIT, or the bridge level's block size if
    smaller, so that a chunk transforms about as many points as the bridge level's block (rows
    x unit for every level) and the bridge size bounds the largest token's latency; doubled
    while the unit has fewer free phases (`free_phases`) than there are levels to place."""
    levels = cls.spread_levels(layout)
    smallest = min(layout.plan.size(k) for k in levels)
    unit = min(SPREAD_UNIT, layout.bridge, smallest)
    while len(cls.free_phases(layout, unit)) < len(levels) and 2 * unit <= smallest:
      unit *= 2
    return unit

  @classmethod
  def free_phases(cls, layout: Layout, unit: int) -> list[int]:
    """The steps p of a unit (0 < p < unit) that in no unit end a tile or carry the bridge
    level's older products (`bridge_phase`)."""
    bridge_phase = cls.bridge_phase(layout)
    return [p for p in range(1, unit) if p % math.gcd(layout.tile, unit) and (
        bridge_phase is None or (p - bridge_phase) % math.gcd(layout.bridge, unit))]

  @staticmethod
  def bridge_phase(layout: Layout) -> int | None:
    """The step inside each bridge-level block after which the bridge level adds the products
    of its next output block's older input blocks (`bridge_older`): the first that ends no
    tile. None (everything at the block's start) without smoothing or when every step ends a
    tile."""
    if layout.bridge is None:
      return None
    return next((p for p in range(1, layout.bridge) if p % layout.tile), None)

  def spread_phase(self, layout: Layout, level: int) -> int:
    """The step inside each unit (`spread_unit`) at which a level above the bridge runs its
    chunks: the levels' phases spread over the unit's free phases (`free_phases`; all steps
    when none is free, as when every step ends a tile)."""
    levels, unit = self.spread_levels(layout), self.spread_unit(layout)
    free = self.free_phases(layout, unit) or list(range(unit))
    return free[levels.index(level) * len(free) // len(levels)]

  def spread_chunk(self, layout: Layout, tables: FlashTables, state: FlashState, level: int,
                   i) -> FlashState:
    """A level above the bridge after the step i - 1: the chunk of streams and channels (if
    any) that this step carries of output block T = i // U + 1, whose inputs (up to block
    T - 2) are in the rings since the tile end (T - 1)U. The chunks of a block are spread over
    its window [(T - 1)U, TU), one per `spread_unit` positions at most, each level at its own
    phase inside the unit (`schedule.smoothed_events` with the unit as its tile), so that no
    step carries two levels' chunks and no tile end carries one."""
    plan, unit = layout.plan, self.spread_unit(layout)
    size = plan.size(level)
    shape = self._channels(state)
    slots = size // unit
    group_streams, chunk, count = self.smooth_chunks(slots, *shape)
    offset = i % size - self.spread_phase(layout, level)
    j = schedule.chunk_at(count, slots, offset // unit)
    block = i // size + 1
    runs = ((offset >= 0) & (offset % unit == 0) & (j < count) & (block >= 2)
            & (block * size < plan.num_steps))
    per_stream = shape[2] // chunk

    def run_chunk(trip, state):
      # trip is 0 (the loop has zero or one trip): the block index depends on it so that XLA
      # cannot hoist the work (a chunk of every channel is a slice at a static offset)
      chunk_index = j + trip
      return self.smoothed_block(layout, tables, state, level, block + trip, 2,
                                 (chunk_index // per_stream) * group_streams,
                                 (chunk_index % per_stream) * chunk,
                                 (group_streams, shape[1], chunk))

    return lax.fori_loop(0, runs.astype(jnp.int32), run_chunk, state)

  @staticmethod
  def smooth_chunks(slots: int, streams: int, batch: int, width: int
                    ) -> tuple[int, int, int]:
    """(streams, channels, count) of the chunks a smoothed level spreads a block over: the
    most chunks, at most one per slot (`spread_unit`) of the block (whole streams first, then
    the smallest share of a stream's channels that divides its width)."""
    del batch  # every chunk holds every batch row
    if streams >= slots:
      group = next(g for g in range(1, streams + 1)
                   if streams % g == 0 and streams // g <= slots)
      return group, width, streams // group
    chunk = next(c for c in range(1, width + 1)
                 if width % c == 0 and streams * (width // c) <= slots)
    return 1, chunk, streams * (width // chunk)

  def smoothed_block(self, layout: Layout, tables: FlashTables, state: FlashState, level: int,
                     block, delay: int, s, c, shape, newest_inputs: Array | None = None,
                     older: Array | None = None) -> FlashState:
    """Adds to output block `block` of a smoothed ring level (positions [block U, block U + U),
    for the streams and channels of one chunk) the products of its input blocks from the
    start of the group before its own to block - delay: transforms the newest, block - delay,
    read from the ring (or given: `newest_inputs`, (S', B, D', U)), and keeps its spectrum in
    slot (block - delay) mod slots for the later output blocks; the older ones are in their
    slots already (or their products are given: `older`, (S', B, D', U + 1))."""
    plan, ring = layout.plan, layout.ring
    size = plan.size(level)
    newest = block - delay
    window = newest_inputs
    if window is None:
      window = lax.dynamic_slice(state.inputs, (s, 0, c, (newest * size) % ring),
                                 shape + (size,))
    x, state = self._input_spectrum(state, window)  # (S', B, D', U + 1)
    spectra = state.input_spectra[size]
    at = lambda q: (q % spectra.shape[0], s, 0, c, 0)
    spectra = lax.dynamic_update_slice(spectra, x[None], at(newest))
    product = x * self._window_spectrum(tables, size, delay, s, c, shape)
    if older is None:
      product = self._older_squares(tables, spectra, size, plan.base, block, delay, s, c,
                                    shape, product)
    else:
      product = product + older
    out = blocks_lib.outputs_from_spectrum(product, size)
    return state._replace(outputs=_add_at(state.outputs, out, (s, 0, c, (block * size) % ring)),
                          input_spectra={**state.input_spectra, size: spectra})

  def _older_squares(self, tables: FlashTables, spectra: Array, size: int, tiling_base: int, block,
                     delay: int, s, c, shape, product: Array) -> Array:
    """`product` (S', B, D', U + 1) plus the products of output block `block` of a smoothed
    level with its input blocks older than block - delay (from the start of the group before
    its own), whose spectra are in `spectra` (slot q mod slots)."""
    newest = block - delay
    at = lambda q: (q % spectra.shape[0], s, 0, c, 0)
    square = lambda q, distance: lax.dynamic_slice(  # input block q's share of the product
        spectra, at(q), (1,) + shape + (size + 1,))[0] * self._window_spectrum(
            tables, size, distance, s, c, shape)
    first = jnp.maximum(schedule.smoothed_first_source(tiling_base, block), 0)
    if size not in tables.spectra:  # windows transformed here: only the due ones
      return lax.fori_loop(first, newest, lambda q, out: out + square(q, block - q), product)
    # One pass over the sources, not a loop (which read and wrote the product once per source:
    # the products are bound by memory traffic): as many terms as the most sources an output
    # block has, each masked when this one has fewer. A masked term reads the first term's
    # spectrum and window again, at the same elements: in cache.
    for p in range(schedule.smoothed_sources(tiling_base, delay)):
      q = first + p
      valid = q < newest
      product = product + jnp.where(valid, square(jnp.where(valid, q, first),
                                                  jnp.where(valid, block - q, block - first)), 0)
    return product

  def bridge_older(self, layout: Layout, tables: FlashTables, state: FlashState, i
                   ) -> FlashState:
    """The bridge level after the step i - 1, at its phase (`bridge_phase`): the products of
    its output block T = i // U + 1 with the input blocks from the start of the group before
    its own to T - 2 (complete, their spectra kept, since (T - 1)U), into `bridge_products`.
    At TU, `bridge_event` adds the newest input block's, so that the block start carries one
    product instead of up to 2b - 1."""
    plan, size = layout.plan, layout.bridge
    block = i // size + 1
    runs = ((i % size == self.bridge_phase(layout)) & (block >= 2)
            & (block * size < plan.num_steps))

    def run(trip, state):
      def compute(st, s, c, group):
        zeros = jnp.zeros(group + (size + 1,), jnp.complex64)
        older = self._older_squares(tables, st.input_spectra[size], size, plan.base,
                                    block + trip, 1, s, c, group, zeros)
        return st._replace(bridge_products={size: lax.dynamic_update_slice(
            st.bridge_products[size], older, (s, 0, c, 0))})
      return self._groups(size, self._channels(state), compute, state)

    return lax.fori_loop(0, runs.astype(jnp.int32), run, state)

  @staticmethod
  def _input_spectrum(state: FlashState, window: Array) -> tuple[Array, FlashState]:
    """`blocks.input_spectrum` of a smoothed level's input block (S', B, D', U), through the
    level's `padded_windows` buffer when it has one of this shape."""
    size = window.shape[-1]
    padded = state.padded_windows.get(size)
    if padded is None or padded.shape[:3] != window.shape[:3]:
      return blocks_lib.input_spectrum(window), state
    padded = lax.dynamic_update_slice_in_dim(padded, window, 0, axis=3)
    return jnp.fft.rfft(padded), state._replace(
        padded_windows={**state.padded_windows, size: padded})

  def _window_spectrum(self, tables: FlashTables, size: int, distance, s, c, shape) -> Array:
    """The spectrum of the filter window of block distance `distance` (taps
    [(d - 1)U, (d + 1)U)) for a group's streams and channels: (S', 1, D', U + 1)."""
    streams, _, chunk = shape
    if size in tables.spectra:
      return lax.dynamic_slice(tables.spectra[size], (distance - 1, s, c, 0),
                               (1, streams, chunk, size + 1))[0][:, None]
    taps = self._taps(tables, (distance - 1) * size, 2 * size, s, c, shape)
    return blocks_lib.filter_spectrum(taps[:, :, 0, :], size)[:, None]

  @staticmethod
  def _direct_taps(tables: FlashTables, rows: int, size: int, reach, s, c, shape) -> Array:
    """Taps [reach - rows, reach + size) of the group's streams and channels, zero before 0:
    (rows + size, S', 1, D'). Gathered (whole rows; see `staged_event`) from
    `FlashTables.direct_taps`, or for a window larger than it, from a padded copy of the
    first taps."""
    streams, _, chunk = shape
    table = tables.direct_taps
    head = 0 if table is None else table.shape[0] // 2
    if rows + size > head:  # outside the table (tau unresolved in `prepare`, large windows)
      head = rows + size
      table = Flash._padded_head(tables.taps, head)
    start = head - rows + reach
    if isinstance(start, int):
      window = lax.slice_in_dim(table, start, start + rows + size, axis=0)
    else:
      window = jnp.take(table, start + jnp.arange(rows + size), axis=0)
    return lax.dynamic_slice(window, (0, s, c), (rows + size, streams, chunk))[:, :, None]

  @staticmethod
  def _taps(tables: FlashTables, start, rows: int, s, c, shape) -> Array:
    """Filter rows [start, start + rows) of the group's streams and channels (zero outside
    the taps), as (rows, S', 1, D')."""
    streams, _, chunk = shape
    return blocks_lib.filter_window(tables.taps, start, rows, (s, c),
                                    (streams, chunk))[:, :, None, :]

  def group_shape(self, rows: int, streams: int, batch: int, width: int) -> tuple[int, int]:
    """(streams, channels) of one group of an event reading `rows` input rows: everything
    when its input window fits in `group_bytes` (and blocks are layer-parallel), else one
    stream and the widest power-of-two share of D that fits."""
    group_bytes = self.options.group_bytes
    if self.options.layer_parallel and rows * streams * batch * width * 4 <= group_bytes:
      return streams, width
    chunk = width
    while chunk % 2 == 0 and rows * batch * chunk * 4 > group_bytes:
      chunk //= 2
    return 1, chunk
