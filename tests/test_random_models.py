"""Random models (orders 2-4, odd widths and lengths) against the independent NumPy forward;
causality; `init_params`.

The NumPy reference (`numpy_reference.hyenadna_logits`) reads a PyTorch-layout state dict, made
from the Flax parameters by `state_dict_helpers.state_dict_from_params`, a mapping written
independently of the loader's (the two are checked against each other by a round trip).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax.io import hyenadna
from lcsm_jax.models.hyena.config import PRESETS, HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.params import check_params, init_params
from numpy_reference import _implicit_filter, hyenadna_logits
from state_dict_helpers import reference_config, state_dict_from_params

CASES = {
    # order 2, odd width, two layers, one inner filter layer, padded vocabulary.
    "order2-d5": (HyenaConfig(vocab_size=11, d_model=5, n_layer=2, d_inner=7, l_max=23,
                              order=2, filter_order=6, emb_dim=3, num_inner_mlps=1,
                              pad_vocab_size_multiple=8), (2, 13)),
    # order 3, wider short filter, no modulation, float32 residual off, length == l_max.
    "order3-d7": (HyenaConfig(vocab_size=5, d_model=7, n_layer=3, d_inner=9, l_max=41, order=3,
                              filter_order=8, emb_dim=5, short_filter_order=4, num_inner_mlps=2,
                              modulate=False, residual_in_fp32=False,
                              pad_vocab_size_multiple=1), (1, 41)),
    # order 4, one layer, no inner filter layers, short filter of width 2.
    "order4-d3": (HyenaConfig(vocab_size=7, d_model=3, n_layer=1, d_inner=5, l_max=9, order=4,
                              filter_order=4, emb_dim=3, short_filter_order=2, num_inner_mlps=0,
                              modulation_shift=0.2, pad_vocab_size_multiple=2), (3, 9)),
}


def _relative_error(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _perturbed_params(config, seed):
  """`init_params`, then every array moved at random: zero biases, unit LayerNorm scales and
  equal Sin frequencies would hide mistakes in their handling."""
  params = init_params(config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x + 0.2 * rng.standard_normal(x.shape), np.float32), params)


@pytest.fixture(scope="module", params=sorted(CASES))
def random_case(request):
  config, shape = CASES[request.param]
  params = _perturbed_params(config, seed=len(request.param) + config.order)
  ids = np.random.default_rng(config.d_model).integers(0, config.vocab_size, shape)
  state = state_dict_from_params(config, params)
  return config, params, ids, hyenadna_logits(state, reference_config(config), ids)


def test_state_dict_mappings_are_inverse(random_case):
  config, params, _, _ = random_case
  state = state_dict_from_params(config, params, dtype=np.float32)
  back = hyenadna.params_from_state_dict(config, state)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_float64_fft_and_direct_match_numpy_reference(random_case):
  config, params, ids, want = random_case
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    got = {}
    for long_conv in ("fft", "direct"):
      model = HyenaLM(config, long_conv=long_conv, dtype=jnp.float64, param_dtype=jnp.float64)
      got[long_conv] = np.asarray(jax.jit(model.apply)(params64, ids))
  for long_conv, logits in got.items():
    assert logits.shape == ids.shape + (config.padded_vocab_size,)
    assert _relative_error(logits, want) <= 1e-10, long_conv
  assert _relative_error(got["fft"], got["direct"]) <= 1e-10


def test_float32_matches_numpy_reference(random_case):
  config, params, ids, want = random_case
  logits = jax.jit(HyenaLM(config).apply)(params, ids)
  assert logits.dtype == jnp.float32
  # Each Sin(freq * x) layer of the filter MLP (freq ~ 10) multiplies the float32 round-off of
  # its input by about 10, so the error grows with num_inner_mlps: measured 5e-6 (one Sin
  # layer), 1e-5 (two) and 3e-4 (three, order 3), the same for the FFT and the direct sum.
  # Exactness itself is checked in float64 above (1e-10).
  assert _relative_error(logits, want) <= 1e-3


@pytest.mark.parametrize("long_conv", ["fft", "direct"])
def test_causality(long_conv):
  config = CASES["order3-d7"][0]  # order 3, three layers (and its init is compiled already)
  params = init_params(config, jax.random.key(1))
  apply = jax.jit(HyenaLM(config, long_conv=long_conv).apply)
  vocab = config.vocab_size
  ids = np.random.default_rng(2).integers(0, vocab, (2, 40))
  base = np.asarray(apply(params, ids))
  scale = np.abs(base).max()
  for t in (0, 1, 17, 39):
    changed = ids.copy()
    changed[:, t] = (changed[:, t] + 1) % vocab
    diff = np.abs(np.asarray(apply(params, changed)) - base).max(axis=-1)  # (B, L)
    if long_conv == "direct":
      assert diff[:, :t].max(initial=0.0) == 0.0, t  # nothing before t moves, bit for bit
    else:
      # Only float32 round-off moves before t: the FFT mixes all positions' rounding errors
      # (measured <= 4e-5 * scale).
      assert diff[:, :t].max(initial=0.0) <= 2e-4 * scale, t
    # Every position from t on sees the change (measured >= 4.6e-3 * scale).
    assert diff[:, t:].min() >= 1e-3 * scale, t


# -- init_params ----------------------------------------------------------------------------


def test_init_params_structure_and_determinism():
  config = CASES["order3-d7"][0]
  params = init_params(config, jax.random.key(0))
  assert set(params) == {"params"}
  check_params(config, params)  # raises on any path/shape mismatch
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  again = init_params(config, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params, again)
  other = init_params(config, jax.random.key(1))
  assert not np.array_equal(params["params"]["embedder"]["embedding"],
                            other["params"]["embedder"]["embedding"])


def test_init_params_under_transformations():
  config = CASES["order3-d7"][0]
  want = jax.tree.map(lambda x: (x.shape, x.dtype), init_params(config, jax.random.key(4)))
  # Inside jit (traced and lowered; compiling it would only repeat the eager test) and eval_shape.
  lowered = jax.jit(lambda key: init_params(config, key)).lower(jax.random.key(4))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), lowered.out_info) == want
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(4)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == want


def test_init_params_dtypes():
  config = CASES["order2-d5"][0]
  params32 = init_params(config, jax.random.key(3))
  params16 = init_params(config, jax.random.key(3), dtype=jnp.bfloat16)
  flat32 = dict(jax.tree_util.tree_leaves_with_path(params32))
  for path, x in jax.tree_util.tree_leaves_with_path(params16):
    name = jax.tree_util.keystr(path)
    # The positional tables stay float32, as HyenaLM(param_dtype=bfloat16) creates them.
    want_dtype = jnp.float32 if name.endswith(("['z']", "['t']")) else jnp.bfloat16
    assert x.dtype == want_dtype, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat32[path].astype(want_dtype)))
  with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
    init_params(config, jax.random.key(3), dtype=jnp.float64)
  with pytest.raises(ValueError, match="float16 is not supported"):
    init_params(config, jax.random.key(3), dtype=jnp.float16)
  with jax.enable_x64(True):  # abstractly: the cast is what is checked, not the draws again
    params64 = jax.eval_shape(lambda: init_params(config, jax.random.key(3), dtype=jnp.float64))
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params64))


def test_init_params_filters_are_not_trivial():
  config = PRESETS["tiny-1k"]
  params = init_params(config, jax.random.key(0))
  state = state_dict_from_params(config, params)
  for layer in range(config.n_layer):
    h = _implicit_filter(state, f"backbone.layers.{layer}.mixer.filter_fn", config.l_max,
                         config.num_inner_mlps)  # (l_max, D), independent NumPy filter
    rms = np.sqrt((h ** 2).mean())
    assert rms >= 0.05  # measured 0.2
    # It changes along time and differs between channels (not a constant or a copy).
    assert h.std(axis=0).mean() >= 0.5 * rms
    assert h.std(axis=1).mean() >= 0.1 * rms
    # The exponential window makes late taps smaller than early ones.
    assert np.abs(h[-100:]).mean() < np.abs(h[:100]).mean()
