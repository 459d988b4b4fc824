"""The tiling covers every pair s < t of online positions exactly once, in a valid order."""

import random

import pytest

from lcsm_jax.decoding import schedule


def _check_plan(plan):
  """Replays the schedule: blocks read only finished inputs and write only future outputs."""
  m = plan.num_steps
  steps_done = 0
  cover = {}
  sizes = set()
  for event in schedule.simulate(plan):
    if event[0] == "step":
      assert event[1] == steps_done, "steps must run in order"
      steps_done += 1
      continue
    _, level, end, rows = event
    size = 1 << level
    sizes.add(size)
    assert end == steps_done, "a block runs right after the step that completes its inputs"
    assert end - size >= 0 and 1 <= rows <= size
    for s in range(end - size, end):
      for t in range(end, min(end + rows, m)):
        cover[(s, t)] = cover.get((s, t), 0) + 1
  assert steps_done == m
  expected = {(s, t) for s in range(m) for t in range(s + 1, m)}
  assert set(cover) == expected
  assert all(count == 1 for count in cover.values()), "a pair was covered twice"
  assert sizes == set(plan.block_sizes), (sizes, plan.block_sizes)
  assert schedule.ring_conflicts(plan) == []


LENGTHS = list(range(0, 130)) + [255, 256, 257, 300, 511, 777, 1000, 1023, 1024, 1025]


@pytest.mark.parametrize("num_steps", LENGTHS)
def test_blocks_cover_every_pair_once(num_steps):
  _check_plan(schedule.FlashPlan(num_steps))


def test_random_lengths_cover_every_pair_once():
  rng = random.Random(1234)
  for _ in range(10):
    _check_plan(schedule.FlashPlan(rng.randrange(2, 1500)))


def test_block_sizes_grow_logarithmically():
  for m, levels in [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1 << 20, 20),
                    ((1 << 20) + 1, 21)]:
    assert schedule.levels_for(m) == levels
    assert schedule.FlashPlan(m).block_sizes == [1 << k for k in range(levels)]


def test_ring_buffers_hold_half_the_positions():
  for k in range(1, 21):
    assert schedule.ring_rows(schedule.FlashPlan(1 << k)) == 1 << (k - 1)
  for m in [3, 100, 218, 1000, 1025, (1 << 20) + 1, 3 << 18]:
    assert m / 2 <= schedule.ring_rows(schedule.FlashPlan(m)) < m
  assert schedule.ring_rows(schedule.FlashPlan(0)) == schedule.ring_rows(schedule.FlashPlan(1)) == 1


@pytest.mark.parametrize("num_steps", [3, 4, 5, 17, 64, 100, 257])
def test_a_smaller_ring_is_caught(num_steps):
  plan = schedule.FlashPlan(num_steps)
  assert schedule.ring_conflicts(plan, schedule.ring_rows(plan) // 2)


def test_block_predicate_matches_lowbit():
  plan = schedule.FlashPlan(1000)
  for i in range(1, 1000):
    (level, _), = plan.blocks_after(i)
    assert 1 << level == schedule.lowbit(i)
  assert plan.blocks_after(1000) == []


def test_invalid_plans_are_rejected():
  with pytest.raises(ValueError, match="num_steps"):
    schedule.FlashPlan(-1)
