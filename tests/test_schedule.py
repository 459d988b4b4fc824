"""The base-b tiling covers every pair s < t of online positions exactly once, in a valid
order, and its rings are large enough."""

import random

import pytest

from lcsm_jax.decoding import schedule


def _check_plan(plan, direct_levels=frozenset()):
  """Replays the schedule: events read only finished inputs and write only future outputs;
  every pair is accounted for once, both as the FFT levels see it (input block against the
  rest of its group) and as the direct levels do (the group so far against the next block)."""
  m, b = plan.num_steps, plan.base
  steps_done = 0
  by_input, by_output = {}, {}
  sizes = set()
  for event in schedule.simulate(plan):
    if event[0] == "step":
      assert event[1] == steps_done, "steps must run in order"
      steps_done += 1
      continue
    _, level, end, rows = event
    size = b ** level
    sizes.add(size)
    assert end == steps_done, "an event runs right after the step that completes its inputs"
    assert end % size == 0 and (end // size) % b != 0
    assert end - size >= 0 and 1 <= rows <= size
    inputs, outputs = plan.covered(level, end)
    for s in inputs:
      for t in outputs:
        by_input[(s, t)] = by_input.get((s, t), 0) + 1
    group_start = end - end % (b * size)
    for s in range(group_start, end):
      for t in range(end, min(end + rows, m)):
        by_output[(s, t)] = by_output.get((s, t), 0) + 1
  assert steps_done == m
  expected = {(s, t) for s in range(m) for t in range(s + 1, m)}
  for cover in (by_input, by_output):
    assert set(cover) == expected
    assert all(count == 1 for count in cover.values()), "a pair was covered twice"
  assert sizes == set(plan.block_sizes), (sizes, plan.block_sizes)
  assert schedule.ring_conflicts(plan, direct_levels=direct_levels) == []


LENGTHS = list(range(0, 130)) + [255, 256, 257, 300, 511, 777, 1000, 1023, 1024, 1025]


@pytest.mark.parametrize("num_steps", LENGTHS)
def test_binary_blocks_cover_every_pair_once(num_steps):
  _check_plan(schedule.FlashPlan(num_steps))


@pytest.mark.parametrize("base", [4, 8, 16])
@pytest.mark.parametrize("num_steps", [0, 1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 100, 255,
                                       256, 257, 300, 1000])
def test_base_b_blocks_cover_every_pair_once(base, num_steps):
  plan = schedule.FlashPlan(num_steps, base)
  _check_plan(plan)
  # with the small levels direct (reading their group from its start), rings still suffice
  _check_plan(plan, direct_levels=frozenset(range(min(2, plan.num_levels))))
  _check_plan(plan, direct_levels=frozenset(range(plan.num_levels)))


def test_random_lengths_cover_every_pair_once():
  rng = random.Random(1234)
  for _ in range(10):
    _check_plan(schedule.FlashPlan(rng.randrange(2, 1500), rng.choice(schedule.BASES)))


def test_block_sizes_grow_logarithmically():
  for m, levels in [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1 << 20, 20),
                    ((1 << 20) + 1, 21)]:
    assert schedule.levels_for(m) == levels
    assert schedule.FlashPlan(m).block_sizes == [1 << k for k in range(levels)]
  assert schedule.FlashPlan(1 << 14, 4).block_sizes == [4 ** k for k in range(7)]
  assert schedule.FlashPlan((1 << 14) + 1, 16).block_sizes == [1, 16, 256, 4096]


def test_distances_and_rows_written():
  plan = schedule.FlashPlan(16383, 4)
  assert [plan.distances(k) for k in range(plan.num_levels)] == [3] * 7
  plan = schedule.FlashPlan(10000, 16)  # top level 4096: blocks starting at 0, 4096, 8192
  assert plan.distances(plan.num_levels - 1) == 2
  assert plan.rows_written(plan.num_levels - 1) == 4096
  plan = schedule.FlashPlan(6000, 16)   # a single top event: the rows up to M only
  assert plan.distances(3) == 1 and plan.rows_written(3) == 6000 - 4096


def test_ring_buffers_hold_half_the_positions():
  for k in range(1, 21):
    assert schedule.ring_rows(schedule.FlashPlan(1 << k)) == 1 << (k - 1)
  for m in [3, 100, 218, 1000, 1025, (1 << 20) + 1, 3 << 18]:
    assert m / 2 <= schedule.ring_rows(schedule.FlashPlan(m)) < m
  assert schedule.ring_rows(schedule.FlashPlan(0)) == schedule.ring_rows(schedule.FlashPlan(1)) == 1
  # base b: the largest block size, at most M - 1 and at least M / b
  for base in (4, 8, 16):
    for m in [5, 100, 1000, 1 << 14]:
      assert m / base <= schedule.ring_rows(schedule.FlashPlan(m, base)) < m


@pytest.mark.parametrize("base,num_steps", [(2, 3), (2, 4), (2, 5)] + [
    (base, m) for base in schedule.BASES for m in (17, 64, 100, 257)])
def test_a_smaller_ring_is_caught(base, num_steps):
  plan = schedule.FlashPlan(num_steps, base)
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
  for base in (0, 1, 3, 32, True, 2.0):
    with pytest.raises(ValueError, match="base"):
      schedule.FlashPlan(10, base)


def _check_smoothed(plan, bridge_level, tile, chunks, phase, bridge_phase=None):
  """The smoothed schedule covers every pair once, reads only finished inputs, writes only
  future outputs (a step ahead above the bridge level), runs every chunk of every block once,
  and fits rings of twice the largest block."""
  m, b = plan.num_steps, plan.base
  ring = 2 * plan.size(plan.num_levels - 1)
  cover = {}
  for event in schedule.simulate(plan):
    if event[0] == "block" and event[1] < bridge_level:
      inputs, outputs = plan.covered(event[1], event[2])
      for s in inputs:
        for t in outputs:
          cover[(s, t)] = cover.get((s, t), 0) + 1
  chunks_run, most_older = {}, {}
  bridge = plan.size(bridge_level)
  for time, level, inputs, outputs, j in schedule.smoothed_events(plan, bridge_level, tile,
                                                                  chunks, phase, bridge_phase):
    assert 0 < time < m
    early = level == bridge_level and time % bridge != 0  # the bridge's older input blocks
    if level == bridge_level:
      assert time % bridge in (0, bridge_phase)
      if bridge_phase is not None and not early:
        assert len(inputs) == bridge, "only the newest input block at the block's start"
    assert inputs.stop <= time, "inputs complete before the work"
    assert outputs.start >= time + (level > bridge_level), "outputs still pending"
    if level > bridge_level:  # inputs complete at a tile end, outputs staged at one
      assert inputs.stop // tile * tile <= time and outputs.start >= time // tile * tile + tile
    # only the newest input block is read from the ring (the older ones' spectra are kept)
    assert time - (inputs.stop - plan.size(level)) <= ring and outputs.stop - time <= ring
    assert ((outputs.start - inputs.start) // plan.size(level)
            <= schedule.smoothed_distances(plan, level))
    # the engine's one-pass product has a term for each input block but the newest
    delay = 1 if level == bridge_level else 2
    older = len(inputs) // plan.size(level) - (not early)
    most_older[delay] = max(most_older.get(delay, 0), older)
    assert older <= schedule.smoothed_sources(b, delay)
    chunks_run.setdefault((level, outputs.start), []).append(j)
    if j == 0:
      for s in inputs:
        for t in outputs:
          cover[(s, t)] = cover.get((s, t), 0) + 1
  if m > 4 * b * plan.size(bridge_level + 1):  # a last block of a group, a group after it
    assert most_older == {1: schedule.smoothed_sources(b, 1), 2: schedule.smoothed_sources(b, 2)}
  for (level, _), ids in chunks_run.items():
    if level == bridge_level:  # whole, or its older input blocks apart
      assert set(ids) == {0} and len(ids) <= 1 + (bridge_phase is not None)
    else:
      assert sorted(ids) == list(range(chunks(level)))
  pairs = {(s, t) for s in range(m) for t in range(s + 1, m)}
  assert set(cover) == pairs
  assert all(count == 1 for count in cover.values()), "a pair was covered twice"


@pytest.mark.parametrize("base", [2, 4, 8])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 16, 17, 63, 64, 65, 100, 255, 256, 257, 300])
def test_smoothed_schedule_covers_every_pair_once(base, num_steps):
  plan = schedule.FlashPlan(num_steps, base)
  for bridge_level in range(plan.num_levels - 1):  # smoothing needs a level above the bridge
    for tile_level in sorted({0, bridge_level // 2, bridge_level}):
      tile = plan.size(tile_level)
      slots = lambda level: plan.size(level) // tile
      for chunks in (1, 3, None):
        count = lambda level: min(chunks or slots(level), slots(level))
        phase = lambda level: (level * 3) % tile
        _check_smoothed(plan, bridge_level, tile, count, phase)
        bridge = plan.size(bridge_level)
        for bridge_phase in sorted({1, bridge // 2, bridge - 1} - {0, bridge}):
          _check_smoothed(plan, bridge_level, tile, count, phase, bridge_phase)


def test_chunk_at_inverts_spread_slot():
  for chunks in range(1, 9):
    for slots in range(chunks, 17):
      found = [schedule.chunk_at(chunks, slots, e) for e in range(slots)]
      assert [j for j in found if j < chunks] == list(range(chunks))
      assert all(schedule.spread_slot(chunks, slots, j) == e
                 for e, j in enumerate(found) if j < chunks)
