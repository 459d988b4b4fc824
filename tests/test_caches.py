"""`lcsm_jax.clear_caches`: the compiled programs kept by the library and by JAX are released
(their code mappings unmapped), and generation afterwards compiles anew to the same tokens; a
session about to compile in a process near the kernel's mapping limit clears them itself."""

import gc
import sys

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax.decoding import memory
from lcsm_jax.decoding import session as session_lib
from lcsm_jax.models.hyena import HyenaConfig, init_params

CONFIG = HyenaConfig(vocab_size=11, d_model=8, n_layer=2, d_inner=16, l_max=40, order=2,
                     filter_order=8, emb_dim=3)


def _mappings() -> int:
  return memory.memory_mappings()[0]


def _tokens(params, strategy: str) -> np.ndarray:
  decoder = lcsm_jax.Decoder(params, CONFIG, strategy, max_length=30, tau=2)
  out, _ = decoder.generate(decoder.prefill(np.array([[1, 2, 3, 4]])), 12, jax.random.key(3),
                            temperature=1.2)
  return np.asarray(out.tokens)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/maps")
def test_clear_caches_releases_compiled_programs():
  params = init_params(CONFIG, jax.random.key(0))
  lcsm_jax.clear_caches()
  gc.collect()
  baseline = _mappings()
  first = {s: _tokens(params, s) for s in ("flash", "lazy")}
  assert session_lib.compile_program.cache_info().currsize > 0
  assert memory.program_bytes.cache_info().currsize > 0
  compiled = _mappings()
  assert compiled > baseline
  lcsm_jax.clear_caches()
  gc.collect()
  assert session_lib.compile_program.cache_info().currsize == 0
  assert session_lib.shapes_of.cache_info().currsize == 0
  assert memory.program_bytes.cache_info().currsize == 0
  released = compiled - _mappings()
  assert released > (compiled - baseline) // 2, (baseline, compiled, released)
  for strategy, tokens in first.items():
    np.testing.assert_array_equal(_tokens(params, strategy), tokens, err_msg=strategy)
  assert session_lib.compile_program.cache_info().currsize > 0


def test_mappings_are_counted_against_the_kernels_limit():
  counts = memory.memory_mappings()
  if not sys.platform.startswith("linux"):
    assert counts is None
    return
  held, limit = counts
  with open("/proc/sys/vm/max_map_count") as f:
    assert limit == int(f.read())
  assert 0 < held < limit


@pytest.mark.parametrize("held, clears", [(749, False), (751, True)])
def test_a_session_near_the_mapping_limit_clears_the_caches(monkeypatch, held, clears):
  """Above 3/4 of the limit, compiling a session's program first clears the caches (with a
  warning naming the limit), and generation still gives the same tokens."""
  params = init_params(CONFIG, jax.random.key(1))
  want = _tokens(params, "flash")
  sentinel = jax.jit(lambda x: x + 1)
  sentinel(1.0)
  assert sentinel._cache_size() == 1
  lcsm_jax.clear_caches()  # the next session compiles (its programs are not in the cache)
  sentinel(1.0)
  monkeypatch.setattr(memory, "memory_mappings", lambda: (held, 1000))
  if clears:
    with pytest.warns(RuntimeWarning, match=r"holds 751 memory mappings of the 1000.*"
                                            r"vm.max_map_count"):
      got = _tokens(params, "flash")
  else:
    got = _tokens(params, "flash")
  np.testing.assert_array_equal(got, want)
  assert sentinel._cache_size() == (0 if clears else 1)
