"""The language model's prefill in runs of positions (`models.hyena.chunked_prefill`).

Checked against the NumPy float64 reference of the architecture (logits), against the parallel
forward's cache (convolution inputs and short-convolution windows, float64), through the
decoding engine (tokens and logits of generation after a chunked prefill equal those after the
parallel one), and by XLA's memory analysis (the chunked program needs less).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import models
from lcsm_jax.models.hyena import HyenaConfig
from lcsm_jax.models.hyena import HyenaLM
from lcsm_jax.models.hyena import init_params
from lcsm_jax.models.hyena.chunked_prefill import for_each_run
from lcsm_jax.models.hyena.chunked_prefill import prefill_in_chunks
from lcsm_jax.models.hyena.online import HyenaOnline
from numpy_reference import hyenadna_logits
from state_dict_helpers import reference_config, state_dict_from_params
from test_random_models import CASES, _perturbed_params


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  config, shape = CASES[request.param]
  params = _perturbed_params(config, seed=3 + config.order)
  ids = np.random.default_rng(config.n_layer).integers(0, config.vocab_size, shape)
  want = hyenadna_logits(state_dict_from_params(config, params), reference_config(config), ids)
  return config, params, ids, want


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_float64_matches_reference_and_parallel_cache(case, chunk):
  config, params, ids, want = case
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    got = prefill_in_chunks(config, p64, jnp.asarray(ids), chunk, dtype=jnp.float64)
    model = HyenaLM(config, dtype=jnp.float64, param_dtype=jnp.float64)
    _, cache = model.apply(p64, ids, collect_cache=True)
  batch, length = ids.shape
  assert got.outputs.shape == (batch, length, config.padded_vocab_size)
  assert _relative_error(got.outputs, want) <= 1e-10
  inputs = np.moveaxis(np.asarray(cache.conv_inputs), 3, 0).reshape(
      length, config.num_streams, batch, config.d_model)
  assert got.conv_inputs.shape == inputs.shape
  assert _relative_error(got.conv_inputs, inputs) <= 1e-10
  assert _relative_error(got.carry, cache.history) <= 1e-10


@pytest.mark.parametrize("with_taps", [False, True])
def test_float32_adapter_prefill(case, with_taps):
  config, params, ids, _ = case
  taps = None
  if with_taps:  # explicit filters (e.g. distilled), longer than the prompt
    rng = np.random.default_rng(0)
    taps = jnp.asarray(rng.standard_normal((ids.shape[1] + 5, config.num_streams,
                                            config.d_model)) * 0.3, jnp.float32)
  whole = HyenaOnline(config, prefill_chunk=None).prefill(params, jnp.asarray(ids), taps)
  chunked = jax.jit(lambda p, x, t: HyenaOnline(config, prefill_chunk=2).prefill(p, x, t))(
      params, jnp.asarray(ids), taps)
  for got, ref in zip(chunked, whole):
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    # float32 round-off, amplified by the filters' Sin layers (see test_random_models);
    # exactness is checked in float64 above
    assert _relative_error(got, ref) <= 1e-4


def test_generation_after_a_chunked_prefill(monkeypatch):
  config = HyenaConfig(vocab_size=12, d_model=8, n_layer=2, d_inner=16, l_max=64,
                       filter_order=8, emb_dim=3)
  params = init_params(config, jax.random.key(0))
  prompt = np.random.default_rng(1).integers(0, config.vocab_size, (2, 23))
  run = lambda strategy: lcsm_jax.generate(params, config, prompt, 20, strategy=strategy,
                                           temperature=0, return_logits=True)
  want = {s: run(s) for s in ("flash", "lazy")}
  adapter = models.online_model
  monkeypatch.setattr(models, "online_model",
                      lambda cfg, **options: adapter(cfg, prefill_chunk=5, **options))
  for strategy, ref in want.items():
    got = run(strategy)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert _relative_error(got.logits, ref.logits) <= 1e-5


def test_chunked_program_needs_less_memory():
  config = HyenaConfig(vocab_size=12, d_model=64, n_layer=2, d_inner=256, l_max=4096,
                       filter_order=16, emb_dim=3)
  params = init_params(config, jax.random.key(0))
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

  def temp_bytes(chunk):
    fn = jax.jit(lambda p, x: HyenaOnline(config, prefill_chunk=chunk).prefill(p, x))
    return fn.lower(params, ids).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(None), temp_bytes(256)
  # the parallel forward holds the in-projection (3 D), its short convolution and the MLP's
  # d_inner = 4 D units of every position; the runs hold about four D-wide arrays
  assert chunked < 0.75 * whole, (chunked, whole)


def test_for_each_run_covers_every_position_once():
  def body(start, size, seen):
    return jax.lax.dynamic_update_slice(seen, jnp.full((size,), 1, jnp.int32) + jax.lax.
                                        dynamic_slice(seen, (start,), (size,)), (start,))
  for length, chunk in [(10, 3), (9, 3), (2, 5), (1, 1)]:
    seen = for_each_run(length, chunk, body, jnp.zeros((length,), jnp.int32))
    np.testing.assert_array_equal(seen, np.ones(length))


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True, "8"])
def test_bad_chunk(chunk):
  config = CASES["order2-d5"][0]
  with pytest.raises(ValueError, match="prefill_chunk must be None or an integer >= 1"):
    HyenaOnline(config, prefill_chunk=chunk)
  if not isinstance(chunk, bool):
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
      prefill_in_chunks(config, {}, jnp.zeros((1, 3), jnp.int32), chunk)


@pytest.mark.parametrize("chunk", [None, 4])
def test_prefill_memory_does_not_grow_with_the_taps(chunk):
  """Strategies hand the prefill all of their taps (a slice would be a copy); the prefill
  must read only the prompt's first rows (it once made a layer-major copy of all of them: 24
  GiB for lazy's prefill of 4096 positions with 2^20 taps)."""
  config = HyenaConfig(vocab_size=12, d_model=8, n_layer=2, d_inner=16, l_max=8192,
                       filter_order=8, emb_dim=3)
  params = init_params(config, jax.random.key(0))
  ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)

  def temp_bytes(rows):
    taps = jax.ShapeDtypeStruct((rows, config.num_streams, config.d_model), jnp.float32)
    fn = jax.jit(lambda p, x, t: HyenaOnline(config, prefill_chunk=chunk).prefill(p, x, t))
    return fn.lower(params, ids, taps).compile().memory_analysis().temp_size_in_bytes

  short, long = temp_bytes(16), temp_bytes(8192)
  taps_bytes = 8192 * config.num_streams * config.d_model * 4
  assert long - short < taps_bytes / 8, (short, long)
