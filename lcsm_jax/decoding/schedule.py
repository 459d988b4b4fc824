"""The Flash Inference tiling in base b, as a static plan over the online (generated) positions.

Online positions are numbered r = 0 .. M-1 (absolute position = prompt length + r). Level k has
blocks of U = b^k positions, gathered in groups of b consecutive blocks (aligned to bU). Inside
a group, the inputs of block q contribute to the outputs of every later block p of the group:
the b(b-1)/2 squares U x U below the group's diagonal. Pairs inside one block are left to the
lower levels and pairs in different groups to the higher ones, so every pair r' < r'' < M is
covered exactly once; the diagonal r' = r'' is added inside the step. Base 2 is the paper's
binary tiling (one square per group).

Events: after the step at r, with i = r + 1 < M, level k has an event when U divides i and
j = (i / U) mod b is not 0: input block q = j - 1 of the current group has just completed, and
output block p = j starts now. The event delivers every square that ends in block j
(`outputs [i, i + U)`) and, by FFT, files the new input block's products with the later blocks
of its group in frequency-domain accumulators, so that each input block is transformed once
and each output block inverse-transformed once (see `decoding/strategies/flash.py`). The
squares (q, p) lie at filter lags ((p - q - 1)U, (p - q + 1)U): `distances(level)` filter
windows per level.

The compiled token loop holds one copy of the event code per level, guarded by its predicate,
so compile time grows with log_b M, not with M. Outputs past M are never read: a level with a
single event (M <= 2U) writes M - U rows, the others whole blocks.

Memory: both the stored inputs and the pending outputs live in ring buffers of
`ring_rows(plan)` rows (the largest block size), position r in row r mod R. Every block's rows
are contiguous there (blocks are aligned to their size, which divides the ring), an event's
inputs are never overwritten before it reads them, and the pending positions at any time span
fewer than R rows (`ring_conflicts` checks all three by replaying the plan).

Smoothed schedule (`smoothed_events`): in the tiling above, a block's first output is due
right after its last input, so an event cannot be spread over later steps, and the top event
stalls one token for the whole of its transforms. The smoothed schedule gives every level
above a bridge level k0 a block of slack: level k > k0 covers the pairs whose level-k blocks
are at least 2 apart (output block T from input blocks S <= T - 2) and whose level-(k + 1)
blocks are at most 1 apart (S from the start of the group before T's); the bridge level
covers the same pairs at distance 1 as well (its squares next to the diagonal, due at once
but small; the engine adds its older input blocks' squares a block early, `bridge_phase`);
the levels below it are the tiling above, inside each of its blocks. Every pair is covered
once: the block distance d_k = T_k - S_k does not grow with k, and the pair falls
to the largest k with d_k >= 2 (or to the bridge level when d_k0 = 1, or below it when
d_k0 = 0). Output block T of a level above the bridge needs only inputs complete at
(T - 1)U, so its work (one forward transform of block T - 2, at most 2b - 2 products, one
inverse transform) is spread in chunks of channels over the steps [(T - 1)U, TU), at most one
chunk per tile, each level at its own phase inside the tile. It transforms every block both
ways (the tiling above skips a (1 / b) share of each) and multiplies up to 2b - 2 window
spectra per output block instead of up to b - 1; rings hold 2R positions.
"""

from __future__ import annotations

import dataclasses

BASES = (2, 4, 8, 16)


def lowbit(i: int) -> int:
  """Largest power of two dividing i (i >= 1)."""
  return i & -i


def levels_for(num_steps: int, base: int = 2) -> int:
  """Number of distinct block sizes (levels k with b^k < M) of the tiling of M online steps."""
  levels, size = 0, 1
  while size < num_steps:
    levels, size = levels + 1, size * base
  return levels


def block_sizes(num_steps: int, base: int = 2) -> list[int]:
  """The block sizes 1, b, b^2, ... used for `num_steps` online steps."""
  return [base ** k for k in range(levels_for(num_steps, base))]


def check_base(base) -> int:
  if not isinstance(base, int) or isinstance(base, bool) or base not in BASES:
    raise ValueError(f"the tiling base must be one of {BASES}, got {base!r}.")
  return base


@dataclasses.dataclass(frozen=True)
class FlashPlan:
  """Static description of one tiled generation of `num_steps` online positions in `base`."""

  num_steps: int
  base: int = 2

  def __post_init__(self):
    if self.num_steps < 0:
      raise ValueError(f"num_steps must be >= 0, got {self.num_steps}.")
    check_base(self.base)

  @property
  def num_levels(self) -> int:
    """K: levels 0 .. K-1 with b^(K-1) < M <= b^K."""
    return levels_for(self.num_steps, self.base)

  @property
  def block_sizes(self) -> list[int]:
    return block_sizes(self.num_steps, self.base)

  def size(self, level: int) -> int:
    return self.base ** level

  def distances(self, level: int) -> int:
    """The block distances p - q (1 .. this) that occur at `level`: b - 1, or fewer at a top
    level whose single group is cut short by M."""
    size = self.size(level)
    blocks = -(-self.num_steps // size)  # blocks that start before M
    return max(min(self.base - 1, blocks - 1), 0)

  def rows_written(self, level: int) -> int:
    """Output rows every event of `level` writes (static): U, or M - U for a level with a
    single event (M <= 2U)."""
    size = self.size(level)
    return self.num_steps - size if self.num_steps <= 2 * size else size

  def runs_block(self, level: int, i):
    """Whether `level` has an event after step i - 1 (i an int or a traced integer)."""
    size = self.size(level)
    return (i % size == 0) & ((i // size) % self.base != 0) & (i < self.num_steps)

  def slot(self, level: int, i):
    """j = (i / U) mod b: the event's output block in its group (1 .. b-1; its completed input
    block is j - 1)."""
    return (i // self.size(level)) % self.base

  def blocks_after(self, i: int) -> list[tuple[int, int]]:
    """(level, rows written) of the events after step i - 1, in execution order."""
    return [(k, self.rows_written(k)) for k in range(self.num_levels) if self.runs_block(k, i)]

  def direct_window(self, level: int) -> int:
    """Rows of inputs a direct (time-domain) event reads: from its group's start, W = U times
    `distances(level)`; the rows at and after the event's end are masked."""
    return self.size(level) * self.distances(level)

  def covered(self, level: int, end: int) -> tuple[range, range]:
    """(inputs, outputs) of the pairs the event of `level` at `end` accounts for: its input
    block against the rest of its group (delivered now or through the accumulators)."""
    size = self.size(level)
    group_end = (end // (self.base * size) + 1) * self.base * size
    return range(end - size, end), range(end, min(group_end, self.num_steps))


def simulate(plan: FlashPlan) -> list[tuple]:
  """The events of the plan in order: ('step', r) and ('block', level, end, rows)."""
  events = []
  for r in range(plan.num_steps):
    events.append(("step", r))
    events.extend(("block", k, r + 1, rows) for k, rows in plan.blocks_after(r + 1))
  return events


def ring_rows(plan: FlashPlan, top_direct: bool = False) -> int:
  """Rows of the input and pending-output ring buffers: the largest block size (at least 1),
  or, when the top level runs directly (`top_direct`), its direct window."""
  if plan.num_levels == 0:
    return 1
  top = plan.num_levels - 1
  return max(plan.size(top), plan.direct_window(top) if top_direct else 0)


def ring_conflicts(plan: FlashPlan, rows: int | None = None,
                   direct_levels: frozenset[int] = frozenset()) -> list[str]:
  """Replays the plan on rings of `rows` rows (default `ring_rows`) and lists every violation:
  an event whose rows wrap around, an input overwritten before an event reads it, or a pending
  output written over another position's unread one. Events of `direct_levels` read their
  group's inputs from its start (`direct_window` rows). Empty when the rings are large enough.
  """
  if rows is None:
    rows = ring_rows(plan, plan.num_levels - 1 in direct_levels)
  m, problems = plan.num_steps, []
  inputs: dict[int, int] = {}   # ring row -> position stored there
  pending: dict[int, int] = {}  # ring row -> position whose output accumulates there
  for event in simulate(plan):
    if event[0] == "step":
      r = event[1]
      if pending.get(r % rows, r) != r:
        problems.append(f"step {r} reads row {r % rows}, which holds position {pending[r % rows]}")
      pending.pop(r % rows, None)
      inputs[r % rows] = r
      continue
    _, level, end, written = event
    size = plan.size(level)
    if level in direct_levels:
      first = end - end % (plan.base * size)
      window = range(first, first + plan.direct_window(level))
    else:
      window = range(end - size, end)
    if window.start % rows + len(window) > rows or end % rows + written > rows:
      problems.append(f"block {size} at {end} wraps around the ring")
    for s in range(window.start, end):
      if inputs.get(s % rows) != s:
        problems.append(f"block {size} at {end} reads input {s}, overwritten")
    for t in range(end, min(end + written, m)):
      if pending.setdefault(t % rows, t) != t:
        problems.append(f"block {size} at {end} writes {t} over pending {pending[t % rows]}")
  return problems


def smoothed_distances(plan: FlashPlan, level: int) -> int:
  """The block distances (1 .. this) a level of the smoothed schedule uses: up to 2b - 1
  (its group and the one before it), fewer when M leaves fewer blocks."""
  blocks = -(-plan.num_steps // plan.size(level))
  return max(min(2 * plan.base - 1, blocks - 1), 0)


def smoothed_first_source(base: int, block):
  """The first input block feeding output `block` of a smoothed level, before clamping at 0:
  the start of the group before its own (an int or a traced integer)."""
  return (block // base - 1) * base


def smoothed_sources(base: int, delay: int) -> int:
  """The most input blocks older than block - delay that feed one output block of a smoothed
  level (delay 2 above the bridge level, 1 at it): from the start of the group before up to
  block - delay - 1, at most 2b - 1 - delay (the last block of a group)."""
  return 2 * base - 1 - delay


def spread_slot(chunks: int, slots: int, j):
  """The slot (0 .. slots - 1) at which chunk j of `chunks` <= slots runs: evenly spread."""
  return (j * slots) // chunks


def chunk_at(chunks: int, slots: int, e):
  """The chunk j whose `spread_slot` is e, or a value >= chunks when no chunk runs at e (an
  int or a traced integer)."""
  j = -(-e * chunks // slots)
  return j + chunks * (spread_slot(chunks, slots, j) != e)


def smoothed_events(plan: FlashPlan, bridge_level: int, tile: int | None = None,
                    chunks=lambda level: 1, phase=lambda level: 0,
                    bridge_phase: int | None = None) -> list[tuple]:
  """The smoothed schedule's work at and above `bridge_level`, in order: (time, level, inputs,
  outputs, chunk): the work after the step time - 1 adds the pairs inputs x outputs for chunk
  `chunk` of `chunks(level)` of the channels. The bridge level works at the end of each of
  its blocks; a level above it spreads output block T over [(T - 1)U, TU): chunk j at
  (T - 1)U + spread_slot(chunks, U / tile, j) tile + phase(level) (phase < tile, so that the
  levels' chunks fall on different steps). With `bridge_phase` (0 < bridge_phase < U), the
  bridge level adds the pairs of output block T with its older input blocks (all but T - 1)
  a block early, at (T - 1)U + bridge_phase, and only the newest at TU. The levels below the
  bridge level are `simulate(plan)`'s events of those levels."""
  b, m = plan.base, plan.num_steps
  bridge = plan.size(bridge_level)
  tile = tile or bridge
  events = []
  for time in range(1, m):
    for level in range(bridge_level, plan.num_levels):
      size = plan.size(level)
      if level == bridge_level:
        if bridge_phase is not None and time % size == bridge_phase:
          block = time // size + 1  # its older input blocks, a block early
          first = max(smoothed_first_source(b, block), 0)
          if block >= 2 and block * size < m:
            events.append((time, level, range(first * size, (block - 1) * size),
                           range(block * size, min((block + 1) * size, m)), 0))
          continue
        if time % size:
          continue
        block, delay, chunk_ids = time // size, 1, [0]
      else:
        offset = time % size - phase(level)
        if offset < 0 or offset % tile:
          continue
        count = chunks(level)
        j = chunk_at(count, size // tile, offset // tile)
        if j >= count:
          continue
        block, delay, chunk_ids = time // size + 1, 2, [j]
      if block * size >= m or block < delay:
        continue
      first = max(smoothed_first_source(b, block), 0)
      if level == bridge_level and bridge_phase is not None:
        first = block - 1  # the older input blocks came a block early
      inputs = range(first * size, (block - delay + 1) * size)
      outputs = range(block * size, min((block + 1) * size, m))
      events.extend((time, level, inputs, outputs, j) for j in chunk_ids)
  return events
