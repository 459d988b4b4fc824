"""Every strategy of the engine reproduces a direct float64 forward of the mixing-only stack."""

import gc
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import decoding
from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding.strategies import Flash
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.convolution import causal_conv_numpy
from lcsm_jax.tuning import crossover as crossover_lib

STRATEGIES = ["flash", "lazy", "eager", "recompute"]


def numpy_forward(stack, params, x):
  """float64 reference of the stack by the direct O(L^2) sum."""
  x = np.asarray(x, np.float64)
  taps = np.asarray(params["taps"], np.float64)
  skip = np.asarray(params["skip"], np.float64)
  for layer in range(stack.num_layers):
    x = np.tanh(causal_conv_numpy(x, taps[layer]) + skip[layer] * x)
  return x


def check_rollout(stack, params, prompt, num_steps, outputs):
  """Outputs of a feedback rollout must equal the forward over the inputs they imply."""
  length = prompt.shape[1]
  chex.assert_shape(outputs, (prompt.shape[0], length + num_steps, stack.width))
  inputs = np.concatenate([np.asarray(prompt), np.asarray(outputs)[:, length - 1:-1]], axis=1)
  np.testing.assert_allclose(outputs, numpy_forward(stack, params, inputs), atol=2e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layers,width,batch,prompt_len,steps", [
    (1, 8, 1, 1, 1),      # a single online step
    (3, 5, 2, 7, 37),     # odd everything, not a power of two
    (2, 16, 3, 1, 64),    # power of two, prompt of one
    (2, 4, 1, 21, 30),    # a prompt long enough for the FFT prompt contribution
])
def test_rollout_matches_direct_forward(strategy, layers, width, batch, prompt_len, steps):
  stack = ConvStack(layers, width, prompt_len + steps)
  params = stack.init(jax.random.key(layers * 100 + width))
  prompt = jax.random.normal(jax.random.key(7), (batch, prompt_len, width))
  outputs = decoding.rollout(params, stack, prompt, steps, strategy=strategy, tau=4, chunk=16)
  check_rollout(stack, params, prompt, steps, outputs)


@pytest.mark.parametrize("prompt_len,steps,chunk", [
    (1, 40, 8),    # one prompt position: the online windows, the first ones moved to tap 0
    (3, 29, 8),    # a prompt shorter than the chunk (its window is the whole prompt)
    (16, 17, 8),   # the chunk divides the prompt
    (21, 19, 8),   # the last prompt window moved back to end at the prompt's end
    (45, 3, 4),    # many prompt windows, steps within one online window
    (5, 60, 64),   # a chunk longer than the filters: the largest power of two that fits
])
def test_lazy_windows_at_every_boundary(prompt_len, steps, chunk):
  """Lazy's prompt and online windows (read backwards, the last ones moved and masked) against
  the float64 direct sum, at prompt lengths and step counts around the chunk."""
  stack = ConvStack(2, 5, prompt_len + steps)
  params = stack.init(jax.random.key(prompt_len + 11 * steps))
  prompt = jax.random.normal(jax.random.key(5), (2, prompt_len, 5))
  session = decoding.Rollout(params, stack, "lazy", chunk=chunk)
  outputs, state = session.prefill(prompt)
  pieces = [outputs]
  rest = steps
  for count in (1, 2, 5, 13):
    count = min(count, rest)
    if count:
      out, state = session.run(state, count)
      pieces.append(out)
      rest -= count
  if rest:
    pieces.append(session.run(state, rest)[0])
  check_rollout(stack, params, prompt, steps, jnp.concatenate(pieces, axis=1))


@pytest.mark.parametrize("options", [
    dict(tau="direct"), dict(tau="fft"), dict(tau=2), dict(tau={1: "fft", 2: "direct", 4: "fft",
    8: "direct", 16: "fft", 32: "direct", 64: "fft"}), dict(tau=1, layer_parallel=False),
    dict(tau=1, precomputed_spectra=False),
    dict(tau=2, spectra_max_size=8),                 # large blocks transform their filters
    dict(tau=4, group_bytes=0, spectra_max_size=16),  # every block stream by stream
    dict(tau="direct", group_bytes=0),
    dict(tau=2, group_bytes=384),  # whole blocks, one-stream groups, stream x 3-channel groups
])
def test_flash_options_give_the_same_result(options):
  stack = ConvStack(2, 6, 100)
  params = stack.init(jax.random.key(3))
  prompt = jax.random.normal(jax.random.key(4), (2, 3, 6))
  outputs = decoding.rollout(params, stack, prompt, 97, strategy="flash", **options)
  check_rollout(stack, params, prompt, 97, outputs)


BASE_OPTIONS = [dict(tau=1), dict(tau="fft"), dict(tau="direct"), dict(tau=4),
                dict(tau=1, spectra_max_size=4),   # large levels transform their filters
                dict(tau=1, precomputed_spectra=False), dict(tau=1, layer_parallel=False),
                dict(tau=1, group_bytes=384)]     # stream and channel groups


@pytest.mark.parametrize("base,options", [(4, options) for options in BASE_OPTIONS] + [
    (base, options) for base in (8, 16) for options in BASE_OPTIONS[:2] + BASE_OPTIONS[4:5]])
@pytest.mark.parametrize("prompt_len,steps", [(1, 99), (21, 64), (2, 17)])
def test_flash_base_b_matches_direct_forward(base, options, prompt_len, steps):
  check_flash_case(base, options, prompt_len, steps)


def check_flash_case(base, options, prompt_len, steps):
  """A 2-layer, 6-channel stack, batch 2, through flash in `base` with `options`."""
  stack = ConvStack(2, 6, prompt_len + steps)
  params = stack.init(jax.random.key(base + steps))
  prompt = jax.random.normal(jax.random.key(prompt_len), (2, prompt_len, 6))
  outputs = decoding.rollout(params, stack, prompt, steps, strategy="flash", base=base,
                             **options)
  check_rollout(stack, params, prompt, steps, outputs)


@pytest.fixture
def static_ends_max(monkeypatch):
  """Sets flash's STATIC_ENDS_MAX for one test; the compiled programs (which bake it in) are
  forgotten before and after."""
  import lcsm_jax
  from lcsm_jax.decoding.strategies import flash as flash_module
  lcsm_jax.clear_caches()
  yield lambda value: monkeypatch.setattr(flash_module, "STATIC_ENDS_MAX", value)
  lcsm_jax.clear_caches()


@pytest.mark.parametrize("base,tau,limit,branches", [
    (4, 4, None, {1: 12, 4: 3}),   # every direct level by static branches (tile 16)
    (4, 4, 0, {1: None, 4: None}),  # every one by gathers at traced offsets
    (2, 8, 4, {1: None, 2: None, 4: 2, 8: 1}),  # tile 16: the small levels have too many
    (8, 8, None, {1: 56, 8: 7})])
def test_direct_levels_by_static_branches_or_gathers_match_direct_forward(
    static_ends_max, base, tau, limit, branches):
  if limit is not None:
    static_ends_max(limit)
  flash = Flash(decoding.EngineOptions(base=base, tau=tau, smooth=False))
  layout = flash.layout(300)
  ends = {layout.plan.size(k): flash.static_ends(layout, k) for k in range(layout.plan.num_levels)
          if layout.plan.size(k) < layout.tile}
  assert {size: e if e is None else len(e) for size, e in ends.items()} == branches
  for size, e in ends.items():  # the output blocks of each level that start inside a tile
    assert e is None or e == [t for t in range(size, layout.tile, size) if t % (base * size)]
  check_flash_case(base, dict(tau=tau), 3, 300)


def test_flash_base_b_with_a_mixed_tau_mapping():
  stack = ConvStack(2, 5, 300)
  params = stack.init(jax.random.key(5))
  prompt = jax.random.normal(jax.random.key(6), (1, 3, 5))
  tau = {1: "fft", 4: "direct", 16: "fft", 64: "fft", 256: "fft"}  # FFT below direct
  outputs = decoding.rollout(params, stack, prompt, 297, strategy="flash", base=4, tau=tau)
  check_rollout(stack, params, prompt, 297, outputs)


def test_flash_group_shape():
  flash = Flash(decoding.EngineOptions(tau="fft", group_bytes=384))
  # (size, streams, batch, width) -> (streams, channels) per group: 2 x 2 x 6 float32 per row
  assert flash.group_shape(4, 2, 2, 6) == (2, 6)    # 384 bytes: the whole block at once
  assert flash.group_shape(8, 2, 2, 6) == (1, 6)    # one stream fits
  assert flash.group_shape(16, 2, 2, 6) == (1, 3)   # half of one stream's channels
  assert flash.group_shape(64, 2, 2, 6) == (1, 3)   # no smaller power-of-two share of 6


def test_rollout_rejects_bad_input():
  stack = ConvStack(1, 4, 10)
  params = stack.init(jax.random.key(0))
  with pytest.raises(ValueError, match="shape"):
    decoding.rollout(params, stack, jnp.zeros((1, 0, 4)), 3)
  with pytest.raises(ValueError, match="exceeds"):
    decoding.rollout(params, stack, jnp.zeros((1, 5, 4)), 6)
  with pytest.raises(ValueError, match="unknown strategy"):
    decoding.rollout(params, stack, jnp.zeros((1, 5, 4)), 2, strategy="fastest")
  with pytest.raises(TypeError, match="unknown engine option"):
    decoding.rollout(params, stack, jnp.zeros((1, 5, 4)), 2, tua=3)
  with pytest.raises(ValueError, match="spectra_max_size"):
    decoding.rollout(params, stack, jnp.zeros((1, 5, 4)), 2, spectra_max_size=0)
  with pytest.raises(ValueError, match="group_bytes"):
    decoding.rollout(params, stack, jnp.zeros((1, 5, 4)), 2, group_bytes=-1)


def test_flash_with_pallas_blocks_is_exact():
  """tau='pallas' runs the Pallas kernel (interpreted on CPU) inside the token loop."""
  stack = ConvStack(2, 4, 24)
  params = stack.init(jax.random.key(9))
  prompt = jax.random.normal(jax.random.key(10), (1, 3, 4))
  outputs = decoding.rollout(params, stack, prompt, 21, strategy="flash", tau="pallas")
  check_rollout(stack, params, prompt, 21, outputs)


SMOOTH_CASES = [  # (base, options): smooth=n spreads the FFT levels above n positions
    (4, dict(tau=1, smooth=1)),               # bridge 4, levels 16, 64 (, 256) spread
    (4, dict(tau=1, smooth=4, group_bytes=384)),
    (4, dict(tau=4, smooth=16)),              # level 16 plain, bridge ... (tile 16)
    (4, dict(tau="fft", smooth=1, spectra_max_size=4)),  # large levels transform their taps
    (4, dict(tau=1, smooth=True, precomputed_spectra=False)),
    (4, dict(tau=1, smooth=1, layer_parallel=False)),
    (2, dict(tau=1, smooth=2)),
    (2, dict(tau=2, smooth=True)),
    (8, dict(tau=1, smooth=1)),
    (16, dict(tau=1, smooth=1)),
]


@pytest.mark.parametrize("base,options", SMOOTH_CASES)
@pytest.mark.parametrize("prompt_len,steps", [(1, 99), (21, 64), (2, 300), (5, 257)])
def test_flash_smoothed_matches_direct_forward(base, options, prompt_len, steps):
  check_flash_case(base, options, prompt_len, steps)


def test_smoothing_is_active_where_a_level_lies_above_the_bridge():
  def layout(num_steps, **options):
    flash = Flash(decoding.EngineOptions(**options))
    return flash.layout(num_steps)

  plain = layout(300, tau=1, base=4, smooth=False)
  assert plain.bridge is None and plain.ring == 256
  smoothed = layout(300, tau=1, base=4, smooth=1)
  assert smoothed.bridge == 4 and smoothed.ring == 512
  assert Flash.spread_levels(smoothed) == [2, 3, 4]
  # input-block spectra kept per level: 2b, or one per block that feeds a later one (the
  # bridge level 4: 75 blocks; 16: 19; 64: 5 blocks, 0 .. 2 feed; 256: 2 blocks, none)
  flash = Flash(decoding.EngineOptions(tau=1, base=4, smooth=1))
  assert [flash.spectrum_slots(smoothed, k) for k in range(1, 5)] == [8, 8, 3, 1]
  assert layout(300, tau=1, base=4, smooth=True).bridge == 16
  assert layout(300, tau=1, base=4, smooth=64).bridge == 64
  assert layout(60, tau=1, base=4, smooth=True).bridge is None  # 16 is the top level
  assert layout(300, tau="direct", base=4, smooth=1).bridge is None  # no FFT level


def test_smooth_chunks_divide_the_channels():
  assert Flash.smooth_chunks(4, 8, 1, 256) == (2, 256, 4)     # whole streams
  assert Flash.smooth_chunks(256, 8, 1, 256) == (1, 8, 256)   # 32 shares of each stream
  assert Flash.smooth_chunks(64, 3, 2, 10) == (1, 1, 30)      # every channel, 30 chunks
  assert Flash.smooth_chunks(16, 3, 2, 10) == (1, 2, 15)
  assert Flash.smooth_chunks(1, 3, 2, 10) == (3, 10, 1)


def test_smoothed_rollout_resumes_call_by_call():
  stack = ConvStack(2, 4, 600)
  params = stack.init(jax.random.key(9))
  prompt = jax.random.normal(jax.random.key(10), (1, 3, 4))
  session = decoding.Rollout(params, stack, "flash", 600, tau=1, smooth=1)
  outputs, state = session.prefill(prompt)
  pieces = [outputs]
  for count in (1, 1, 5, 16, 1, 40, 73, 200, 260):
    out, state = session.run(state, count)
    pieces.append(out)
  outputs = jnp.concatenate(pieces, axis=1)
  check_rollout(stack, params, prompt, 597, outputs)
  # the transform inputs of the smoothed levels transformed by FFT (smaller blocks multiply
  # by the DFT matrices): written in their first half only
  padded = state.engine.strategy.padded_windows
  assert sorted(padded) == [size for size in (4, 16, 64, 256)
                            if size > blocks_lib.MATMUL_DFT_MAX] == [256]
  assert sorted(state.engine.strategy.bridge_products) == [4]  # the bridge level
  for size, buffer in padded.items():
    assert buffer.shape[-1] == 2 * size
    assert not np.any(np.asarray(buffer[..., size:])), size
    assert np.any(np.asarray(buffer[..., :size])), size


@pytest.mark.parametrize("tau,length", [(1, 300), (4, 1000), (16, 5000), (1, 5000)])
def test_spread_chunks_fall_on_distinct_steps_off_the_tile_ends(tau, length):
  flash = Flash(decoding.EngineOptions(tau=tau, base=4, smooth=1))
  layout = flash.layout(length)
  unit, tile = flash.spread_unit(layout), layout.tile
  levels = Flash.spread_levels(layout)
  assert levels and all(layout.plan.size(k) % unit == 0 for k in levels)
  phases = [flash.spread_phase(layout, k) for k in levels]
  assert len(set(phases)) == len(phases) and all(0 <= p < unit for p in phases)
  bridge_phase = Flash.bridge_phase(layout)
  if tile > 1:  # the bridge level's older products: a step of their own, off the tile ends
    assert 0 < bridge_phase < layout.bridge and bridge_phase % tile
  for step in range(1, length):  # every step carries one kind of work at most
    work = [p for p in phases if step % unit == p]
    if tile > 1:
      work += ["tile end"] * (step % tile == 0)
      work += ["bridge"] * (step % layout.bridge == bridge_phase)
    assert len(work) <= 1, (step, work)



@pytest.mark.parametrize("strategy,drops", [("flash", True), ("lazy", True),
                                            ("eager", False), ("recompute", False)])
def test_session_releases_the_taps_its_tables_supply(strategy, drops):
  """The stack's parameters are its taps, and flash's and lazy's tables hold them too: such a
  session gives its programs only the skip terms and lets the full parameters go once the
  tables exist. Strategies that read the model's own filters after prepare keep them."""
  stack = ConvStack(2, 6, 40)
  params = stack.init(jax.random.key(3))
  reference = jax.tree.map(np.array, params)  # copies (np.asarray would keep the buffers)
  taps = weakref.ref(params["taps"])
  session = decoding.Rollout(params, stack, strategy, tau=4)
  assert ("taps" in session.params) is not drops
  del params
  prompt = jax.random.normal(jax.random.key(4), (2, 5, 6))
  outputs, state = session.prefill(prompt)
  rest, _ = session.run(state, 35)
  gc.collect()
  assert (taps() is None) is drops
  check_rollout(stack, reference, prompt, 35, jnp.concatenate([outputs, rest], axis=1))


@pytest.mark.parametrize("base", [2, 4, 8])
def test_unresolved_tables_hold_the_direct_taps_of_every_auto_tau(base):
  """A session's tables are made before tau='auto' is resolved (one per batch size): their
  direct-level taps must cover the windows of any tau it may resolve to, else every call
  slices them from the taps again (XLA hoists that out of the token loop)."""
  from lcsm_jax.tuning import crossover as crossover_lib
  taps = jnp.ones((5000, 2, 3), jnp.float32)
  options = decoding.EngineOptions(base=base)
  head = lambda flash: flash._direct_taps_table(taps).shape[0] // 2
  unresolved = head(Flash(options))
  assert unresolved > 0
  for crossover in (1, 2, 4, 16, 64, 200, crossover_lib.MAX_DIRECT_SIZE):
    resolved = Flash(options, crossover=crossover)
    plan, config = resolved.plan(5000), resolved.block_config(5000)
    windows = [plan.direct_window(k) + plan.size(k) for k in range(plan.num_levels)
               if config.method(plan.size(k)) == "direct"]
    assert max(windows, default=0) <= unresolved, crossover


@pytest.mark.parametrize("base", [2, 4, 8])
def test_the_token_loop_reads_the_direct_taps_of_the_resolved_tau(base):
  """Tables made before tau='auto' was resolved hold the direct taps of the largest tau; the
  token loop of the resolved strategy reads exactly those its own tables would hold (a cut of
  the rows, not a strided read of the whole table)."""
  taps = jax.random.normal(jax.random.key(base), (700, 2, 3))
  options = decoding.EngineOptions(base=base)
  unresolved = Flash(options).prepare(taps)
  for crossover in (1, 4, 16, 64, crossover_lib.MAX_DIRECT_SIZE):
    resolved = Flash(options, crossover=crossover)
    own = resolved._direct_taps_table(taps)  # pylint: disable=protected-access
    cut = resolved.loop_tables(unresolved, 700).direct_taps
    chex.assert_trees_all_equal(cut, own)
    assert cut.shape[0] <= unresolved.direct_taps.shape[0]
  assert Flash(options).loop_tables(unresolved, 700) is unresolved  # unresolved: as it is


@pytest.mark.parametrize("crossover", ["3", "12", "48"])
def test_a_resolved_auto_tau_rollout_matches_direct_forward(crossover, monkeypatch):
  """tau='auto' resolved by a forced crossover (direct levels up to 1, 4 or 16 in base 4),
  run from tables made before the resolution, reproduces the float64 forward."""
  monkeypatch.setenv("LCSM_JAX_CROSSOVER", crossover)
  stack = ConvStack(2, 5, 90)
  params = stack.init(jax.random.key(11))
  prompt = jax.random.normal(jax.random.key(12), (2, 3, 5))
  rollout = decoding.Rollout(params, stack, "flash", max_length=90)
  assert rollout.engine(2).strategy.tau == crossover_lib.direct_limit(4, int(crossover))
  outputs, state = rollout.prefill(prompt)
  rest, _ = rollout.run(state, 87)
  check_rollout(stack, params, prompt, 87, jnp.concatenate([outputs, rest], axis=1))
