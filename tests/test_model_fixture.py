"""The Flax model reproduces the HyenaDNA reference fixture's parallel-forward logits.

Three references, none computed by the code under test:
  * the fixture's `forward_logits` (float64 PyTorch HyenaDNA, tests/fixtures/README.md);
  * `numpy_reference.hyenadna_logits`, an independent float64 NumPy forward that reads the
    fixture's PyTorch state dict directly (through safetensors, not through our loader).
"""

import chex
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lcsm_jax.io.hyenadna import load_hyenadna
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.params import cast_params
from numpy_reference import hyenadna_logits


def _relative_error(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fixture_model(fixture_dir):
  return load_hyenadna(fixture_dir)


@pytest.fixture(scope="module")
def numpy_logits(fixture_dir, fixture_model, fixture_reference):
  config, _ = fixture_model
  state = load_file(str(fixture_dir / "model.safetensors"))
  cfg = dict(d_model=config.d_model, n_layer=config.n_layer, eps=config.layer_norm_epsilon)
  return hyenadna_logits(state, cfg, fixture_reference["forward_input_ids"])


@pytest.mark.parametrize("long_conv,length", [
    ("fft", 1), ("fft", 2), ("fft", 37), ("fft", 300), ("direct", 300)])
def test_float32_forward_matches_fixture(fixture_model, fixture_reference, long_conv, length):
  config, params = fixture_model
  ids = fixture_reference["forward_input_ids"][:, :length]
  logits = jax.jit(HyenaLM(config, long_conv=long_conv).apply)(params, jnp.asarray(ids))
  chex.assert_shape(logits, ids.shape + (config.padded_vocab_size,))
  chex.assert_type(logits, jnp.float32)
  assert _relative_error(logits, fixture_reference["forward_logits"][:, :length]) <= 1e-4


def test_numpy_reference_matches_fixture(numpy_logits, fixture_reference):
  # The independent float64 reference itself agrees with the fixture to its float64 floor.
  assert _relative_error(numpy_logits, fixture_reference["forward_logits"]) <= 1e-7


@pytest.mark.parametrize("long_conv", ["fft", "direct"])
def test_float64_forward_matches_numpy_reference_and_fixture(fixture_model, fixture_reference,
                                                              numpy_logits, long_conv):
  config, params = fixture_model
  ids = fixture_reference["forward_input_ids"]
  # x64 only inside the context: conftest checks after every test that it did not leak.
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    model = HyenaLM(config, long_conv=long_conv, dtype=jnp.float64, param_dtype=jnp.float64)
    apply = jax.jit(model.apply)
    logits = apply(params64, jnp.asarray(ids))
    assert logits.dtype == jnp.float64
    logits = np.asarray(logits)
    prefix = np.asarray(apply(params64, jnp.asarray(ids[:, :37])))
  # Same float64 weights, same float64 arithmetic up to summation order (measured ~7e-16).
  assert _relative_error(logits, numpy_logits) <= 1e-10
  assert _relative_error(prefix, numpy_logits[:, :37]) <= 1e-10
  # The fixture's own float64 logits sit ~2.5e-8 from ANY float64 recomputation from its
  # stored float32 weights (the NumPy reference included): that is the fixture's floor.
  assert _relative_error(logits, fixture_reference["forward_logits"]) <= 1e-7


def _fft_operand_dtypes(fn, *args):
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jex_core.jaxprs_in_params(eqn.params):
        yield from walk(sub)
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return {str(v.aval.dtype) for e in walk(jaxpr) if e.primitive.name == "fft" for v in e.invars}


def test_bfloat16_forward_close_to_float32(fixture_model, fixture_reference):
  config, params = fixture_model
  ids = jnp.asarray(fixture_reference["forward_input_ids"])
  params16 = cast_params(config, params, jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves_with_path(params16)
  assert all(x.dtype == jnp.bfloat16 for path, x in leaves
             if jax.tree_util.keystr(path)[-5:] not in ("['z']", "['t']"))
  model16 = HyenaLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  logits16 = jax.jit(model16.apply)(params16, ids)
  chex.assert_type(logits16, jnp.float32)  # the head promotes its output to float32
  want = fixture_reference["forward_logits"]
  err = _relative_error(logits16, want)
  # bfloat16 keeps 8 significant bits (unit round-off 2^-9 ~ 2e-3). Weights and every
  # activation (embedding, LayerNorms, projections, gates, MLP) are rounded to bfloat16 about
  # ten times per layer before the tied head, which gives errors of a few round-offs
  # (measured 5.2e-3 on the fixture); 2e-2 (~10 round-offs) leaves margin and still fails on
  # any real mistake (a wrong or missing parameter moves logits by O(1)).
  assert err <= 2e-2
  # ...and the computation did run in bfloat16 (a float32 run would be ~3e-7 from the fixture).
  assert err >= 1e-4
  # The long convolutions run their FFTs in float32 (jnp.fft rejects bfloat16).
  dtypes = _fft_operand_dtypes(model16.apply, params16, ids)
  assert dtypes and dtypes <= {"float32", "complex64"}, dtypes
