"""The Flash Inference tiling, as a static plan over the online (generated) positions.

Online positions are numbered r = 0 .. M-1 (absolute position = prompt length + r). After the
step at r, with i = r + 1 < M, the tiling adds the block of size U = lowbit(i) (the largest
power of two dividing i): inputs r' in [i - U, i) contribute to outputs r'' in [i, i + U).
Every pair r' < r'' < M is covered exactly once; the diagonal r' = r'' is added inside the step.

The compiled token loop holds one copy of the block code per block size (level k, U = 2^k),
guarded by `i % 2U == U`, so compile time grows with log M, not with M. Outputs past M are
never read: the top level (one block, at i = 2^(K-1)) is truncated to M - 2^(K-1) rows, and the
other levels write whole blocks, whose rows past M are never read.

Memory: both the stored inputs and the pending outputs live in ring buffers of
`ring_rows(plan)` = 2^(K-1) rows (the largest block size; M/2 when M is a power of two),
position r in row r mod 2^(K-1). Every block's rows are contiguous there (blocks are aligned to
their size, which divides the ring), a block's inputs [i - U, i) are never overwritten before it
reads them (U <= 2^(K-1)), and the pending positions at any time span fewer than 2^(K-1) rows
(`ring_conflicts` checks both by replaying the plan).
"""

from __future__ import annotations

import dataclasses


def lowbit(i: int) -> int:
  """Largest power of two dividing i (i >= 1)."""
  return i & -i


def levels_for(num_steps: int) -> int:
  """Number of distinct block sizes the tiling of `num_steps` online steps uses."""
  return max(num_steps - 1, 0).bit_length()


def block_sizes(num_steps: int) -> list[int]:
  """The block sizes 1, 2, 4, ... used for `num_steps` online steps."""
  return [1 << k for k in range(levels_for(num_steps))]


@dataclasses.dataclass(frozen=True)
class FlashPlan:
  """Static description of one tiled generation of `num_steps` online positions."""

  num_steps: int

  def __post_init__(self):
    if self.num_steps < 0:
      raise ValueError(f"num_steps must be >= 0, got {self.num_steps}.")

  @property
  def num_levels(self) -> int:
    """K: levels 0 .. K-1 with 2^(K-1) < M <= 2^K."""
    return levels_for(self.num_steps)

  @property
  def block_sizes(self) -> list[int]:
    return block_sizes(self.num_steps)

  def rows_written(self, level: int) -> int:
    """Output rows every block of `level` writes (static): U, or M - U for the top level."""
    size = 1 << level
    return self.num_steps - size if level == self.num_levels - 1 else size

  def runs_block(self, level: int, i):
    """Whether the block of `level` runs after step i - 1 (i an int or a traced integer)."""
    size = 1 << level
    return (i % (2 * size) == size) & (i < self.num_steps)

  def blocks_after(self, i: int) -> list[tuple[int, int]]:
    """(level, rows written) of the blocks that run after step i - 1, in execution order."""
    return [(k, self.rows_written(k)) for k in range(self.num_levels) if self.runs_block(k, i)]


def simulate(plan: FlashPlan) -> list[tuple]:
  """The events of the plan in order: ('step', r) and ('block', level, end, rows)."""
  events = []
  for r in range(plan.num_steps):
    events.append(("step", r))
    events.extend(("block", k, r + 1, rows) for k, rows in plan.blocks_after(r + 1))
  return events


def ring_rows(plan: FlashPlan) -> int:
  """Rows of the input and pending-output ring buffers: the largest block size (at least 1)."""
  return 1 << max(plan.num_levels - 1, 0)


def ring_conflicts(plan: FlashPlan, rows: int | None = None) -> list[str]:
  """Replays the plan on rings of `rows` rows (default `ring_rows`) and lists every violation:
  a block whose rows wrap around, an input overwritten before a block reads it, or a pending
  output written over another position's unread one. Empty when the rings are large enough.
  """
  rows = ring_rows(plan) if rows is None else rows
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
    size = 1 << level
    if (end - size) % rows + size > rows or end % rows + written > rows:
      problems.append(f"block {size} at {end} wraps around the ring")
    for s in range(end - size, end):
      if inputs.get(s % rows) != s:
        problems.append(f"block {size} at {end} reads input {s}, overwritten")
    for t in range(end, min(end + written, m)):
      if pending.setdefault(t % rows, t) != t:
        problems.append(f"block {size} at {end} writes {t} over pending {pending[t % rows]}")
  return problems
