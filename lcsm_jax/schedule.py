"""The Flash Inference tiling, as a static plan over the online (generated) positions.

Online positions are numbered r = 0 .. M-1 (absolute position = prompt length + r). After the
step at r, with i = r + 1 < M, the tiling adds the block of size U = lowbit(i) (the largest
power of two dividing i): inputs r' in [i - U, i) contribute to outputs r'' in [i, i + U).
Every pair r' < r'' < M is covered exactly once; the diagonal r' = r'' is added inside the step.

The compiled token loop holds one copy of the block code per block size (level k, U = 2^k),
guarded by `i % 2U == U`, so compile time grows with log M, not with M. Outputs past M are
never read: the top level (one block, at i = 2^(K-1)) is truncated to M - 2^(K-1) rows, and the
other levels write whole blocks into `output_rows(plan)` rows (< 1.5 M; M when M is a power of
two).
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


def output_rows(plan: FlashPlan) -> int:
  """Rows the pending-output buffer needs: M, plus what whole blocks write past M."""
  rows = plan.num_steps
  for level in range(plan.num_levels):
    size = 1 << level
    last = size + (plan.num_steps - 1 - size) // (2 * size) * (2 * size)  # last i < M running it
    rows = max(rows, last + plan.rows_written(level))
  return rows
