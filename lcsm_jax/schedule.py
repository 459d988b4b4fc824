"""The Flash Inference tiling, as a static plan over the online (generated) positions.

Online positions are numbered r = 0 .. M-1 (absolute position = prompt length + r). After the
step at r, with i = r + 1, the tiling adds the block of size U = lowbit(i) (largest power of two
dividing i): inputs r' in [i - U, i) contribute to outputs r'' in [i, i + U), truncated at M.
Every pair r' < r'' is covered exactly once; the diagonal r' = r'' is added inside the step.

The execution order is a recursion over levels with one copy of the code per level, so that
the compiled loop's size grows with the number of block sizes, not with M:

  chunk(k, n) = the first n (1 <= n <= 2^k) steps of an aligned run of 2^k steps, with every
                block that lies inside them:
              = chunk(k-1, min(n, 2^(k-1)))
                + if n > 2^(k-1): block(level k-1); chunk(k-1, n - 2^(k-1))
  run(M)      = chunk(K, M) with 2^(K-1) < M <= 2^K.

Inside the compiled loop n is a traced value; only the top-level block is truncated at M, so
blocks of a partial chunk may write outputs past M: `output_rows(plan)` says how many rows the
output buffer needs. `execute` runs the recursion with caller-supplied primitives: plain
Python (to simulate and test the schedule) or `lax` loops (the jitted generation loop), so both
share one source.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

Carry = Any


def lowbit(i: int) -> int:
  """Largest power of two dividing i (i >= 1)."""
  return i & -i


def levels_for(num_steps: int) -> int:
  """Number of distinct block sizes the tiling of `num_steps` online steps uses."""
  return max(num_steps - 1, 0).bit_length()


def block_sizes(num_steps: int) -> list[int]:
  """The block sizes 1, 2, 4, ... used for `num_steps` online steps."""
  return [1 << k for k in range(levels_for(num_steps))]


def binary_segments(num_steps: int) -> list[int]:
  """Exponents k1 > k2 > ... with num_steps = sum 2^k."""
  return [k for k in range(num_steps.bit_length() - 1, -1, -1) if num_steps >> k & 1]


class Primitives(Protocol):
  """What `execute` needs from its caller. Indices and counts may be ints or traced integers."""

  def step(self, carry: Carry, r: Any) -> Carry:
    """Process online position r (0-based)."""

  def block(self, carry: Carry, level: int, end: Any, out_len: int) -> Carry:
    """Add the block of size 2^level with inputs [end - U, end) to outputs [end, end + out_len)."""

  def repeat(self, count: Any, body: Callable[[Any, Carry], Carry], carry: Carry) -> Carry:
    """body(index, carry) for index = 0 .. count - 1."""

  def run_if(self, pred: Any, body: Callable[[Any, Carry], Carry], carry: Carry) -> Carry:
    """body(zero, carry) if pred, else carry; zero is 0, possibly traced (it keeps the body
    inside the loop: see xla-cpu-loops.md)."""

  def minimum(self, a: Any, b: Any) -> Any:
    """min(a, b) for ints or traced integers."""


@dataclasses.dataclass(frozen=True)
class FlashPlan:
  """Static description of one tiled generation of `num_steps` online positions.

  Attributes:
    num_steps: M, online positions.
    unroll_levels: full chunks of 2^unroll_levels steps are unrolled in Python (no loop inside);
      partial ones take the looped path.
  """

  num_steps: int
  unroll_levels: int = 2

  def __post_init__(self):
    if self.num_steps < 0:
      raise ValueError(f"num_steps must be >= 0, got {self.num_steps}.")
    if self.unroll_levels < 0:
      raise ValueError(f"unroll_levels must be >= 0, got {self.unroll_levels}.")

  @property
  def top_level(self) -> int:
    """K with 2^(K-1) < M <= 2^K."""
    return max(self.num_steps - 1, 0).bit_length()

  @property
  def block_sizes(self) -> list[int]:
    return block_sizes(self.num_steps)


def execute(plan: FlashPlan, prims: Primitives, carry: Carry) -> Carry:
  """Runs the tiled schedule of `plan` through `prims` (see the module docstring)."""

  def full_unrolled(k: int, base: Any, carry: Carry) -> Carry:
    if k == 0:
      return prims.step(carry, base)
    half = 1 << (k - 1)
    carry = full_unrolled(k - 1, base, carry)
    carry = prims.block(carry, k - 1, base + half, half)
    return full_unrolled(k - 1, base + half, carry)

  def looped(k: int, base: Any, n: Any, carry: Carry, top_out_len: int | None = None) -> Carry:
    half = 1 << (k - 1)
    out_len = half if top_out_len is None else top_out_len

    def body(index, carry):
      start = base + index * half
      carry = chunk(k - 1, start, prims.minimum(half, n - index * half), carry)
      return prims.run_if((index == 0) & (n > half),
                          lambda zero, c: prims.block(c, k - 1, start + half + zero, out_len),
                          carry)

    return prims.repeat(1 + (n > half), body, carry)

  def chunk(k: int, base: Any, n: Any, carry: Carry) -> Carry:
    if k == 0:
      return prims.step(carry, base)
    if k > plan.unroll_levels:
      return looped(k, base, n, carry)
    full = n == (1 << k)
    carry = prims.run_if(full, lambda zero, c: full_unrolled(k, base + zero, c), carry)
    return prims.run_if(~full if not isinstance(full, bool) else not full,
                        lambda zero, c: looped(k, base + zero, n, c), carry)

  m = plan.num_steps
  if m == 0:
    return carry
  k = plan.top_level
  if k == 0:
    return prims.step(carry, 0)
  return looped(k, 0, m, carry, top_out_len=m - (1 << (k - 1)))


class _Recorder:
  """Python primitives that record the schedule as a list of events."""

  def step(self, events, r):
    return events + [("step", r)]

  def block(self, events, level, end, out_len):
    return events + [("block", level, end, out_len)]

  def repeat(self, count, body, carry):
    for index in range(count):
      carry = body(index, carry)
    return carry

  def run_if(self, pred, body, carry):
    return body(0, carry) if pred else carry

  def minimum(self, a, b):
    return min(a, b)


def simulate(plan: FlashPlan) -> list[tuple]:
  """The events `execute` produces for `plan`: ('step', r) and ('block', level, end, out_len)."""
  return execute(plan, _Recorder(), [])


def output_rows(plan: FlashPlan) -> int:
  """Rows the pending-output buffer needs: M, plus what blocks of a partial chunk write past M."""
  ends = [end + out_len for kind, *rest in simulate(plan) if kind == "block"
          for _, end, out_len in [rest]]
  return max([plan.num_steps] + ends)
