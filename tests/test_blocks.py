"""Block operations (direct, FFT, batched over streams or not) against a float64 middle product."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax.decoding import blocks
from lcsm_jax.decoding import options as options_lib


def middle_product(inputs, taps, out_len):
  """float64 NumPy: out[j] = sum_k inputs[k] * taps[U + j - k], inputs (U, S, B, D)."""
  inputs = np.asarray(inputs, np.float64)
  taps = np.asarray(taps, np.float64)
  size = inputs.shape[0]
  out = np.zeros((out_len,) + inputs.shape[1:])
  for j in range(out_len):
    for k in range(size):
      out[j] += inputs[k] * taps[size + j - k][:, None, :]
  return out


def _random_block(size, streams, batch, width, seed):
  rng = np.random.default_rng(seed)
  inputs = rng.standard_normal((size, streams, batch, width)).astype(np.float32)
  taps = rng.standard_normal((2 * size + 3, streams, width)).astype(np.float32)
  return inputs, taps


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("layer_parallel", [True, False])
@pytest.mark.parametrize("size,out_len", [(1, 1), (2, 2), (4, 3), (16, 16), (64, 40), (128, 77)])
def test_block_matches_middle_product(method, layer_parallel, size, out_len):
  inputs, taps = _random_block(size, streams=3, batch=2, width=5, seed=size)
  config = blocks.BlockConfig(((size, method),), layer_parallel=layer_parallel)
  spectra = blocks.spectra_for(jnp.asarray(taps), [size] if method == "fft" else [])
  out = jax.jit(lambda x, t, s: blocks.apply_block(config, x, t, s, out_len))(
      inputs, taps, spectra)
  chex.assert_shape(out, (out_len, 3, 2, 5))
  np.testing.assert_allclose(out, middle_product(inputs, taps, out_len), rtol=2e-5,
                             atol=2e-5 * np.sqrt(size))


@pytest.mark.parametrize("by_matmul", [None, True, False])
@pytest.mark.parametrize("size", [1, 2, 16, blocks.MATMUL_DFT_MAX, 2 * blocks.MATMUL_DFT_MAX])
def test_transforms_match_float64_fft_by_matrices_or_not(size, by_matmul):
  """Blocks up to MATMUL_DFT_MAX transform by the DFT matrices (by default), larger ones by
  FFT: both are the zero-padded 2U-point rfft and the second half of its inverse."""
  assert blocks.transforms_by_matmul(size) == (size <= blocks.MATMUL_DFT_MAX)
  rng = np.random.default_rng(size)
  inputs = rng.standard_normal((3, 2, size))
  spectrum = np.fft.rfft(inputs, n=2 * size)
  got = np.asarray(blocks.input_spectrum(jnp.asarray(inputs, jnp.float32), by_matmul))
  assert got.dtype == np.complex64 and got.shape == (3, 2, size + 1)
  np.testing.assert_allclose(got, spectrum, rtol=0, atol=2e-6 * np.abs(spectrum).max())
  product = spectrum * np.fft.rfft(rng.standard_normal((2, 2 * size)))
  out_len = max(size - 3, 1)
  want = np.fft.irfft(product, n=2 * size)[..., size:size + out_len]
  got = np.asarray(blocks.outputs_from_spectrum(jnp.asarray(product, jnp.complex64), out_len,
                                                by_matmul))
  assert got.dtype == np.float32 and got.shape == (3, 2, out_len)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_fft_block_without_precomputed_spectra():
  inputs, taps = _random_block(32, streams=2, batch=1, width=7, seed=0)
  config = blocks.BlockConfig(((32, "fft"),))
  out = blocks.apply_block(config, inputs, taps, {}, 32)
  np.testing.assert_allclose(out, middle_product(inputs, taps, 32), rtol=2e-5, atol=1e-4)


def test_block_config_resolves_tau():
  sizes = [1, 2, 4, 8, 16]
  assert blocks.block_config(sizes, "fft").methods == tuple((s, "fft") for s in sizes)
  assert dict(blocks.block_config(sizes, 4).methods) == {
      1: "direct", 2: "direct", 4: "direct", 8: "fft", 16: "fft"}
  mapping = {1: "direct", 2: "fft", 4: "direct", 8: "fft", 16: "fft"}
  assert dict(blocks.block_config(sizes, options_lib.check_tau(mapping)).methods) == mapping
  with pytest.raises(ValueError, match="must be resolved"):
    blocks.block_config(sizes, "auto")


@pytest.mark.parametrize("tau,match", [
    ("fastest", "tau must be"), (-1, ">= 0"), (True, "tau must be"), ({3: "fft"}, "powers of two"),
    ({1: "magic", 2: "fft", 4: "fft", 8: "fft", 16: "fft"}, "unknown block implementation")])
def test_bad_tau_is_refused_when_options_are_made(tau, match):
  with pytest.raises(ValueError, match=match):
    options_lib.EngineOptions(tau=tau)


def test_a_mapping_that_misses_a_block_size_is_refused():
  with pytest.raises(ValueError, match="no implementation for block sizes"):
    blocks.block_config([1, 2, 4, 8, 16], options_lib.check_tau({1: "direct"}))


@pytest.mark.parametrize("text,want", [("auto", "auto"), ("fft", "fft"), ("32", 32), ("0", 0)])
def test_parse_tau(text, want):
  assert options_lib.parse_tau(text) == want


@pytest.mark.parametrize("text", ["-1", "fast", "1.5", ""])
def test_parse_tau_refuses_other_text(text):
  with pytest.raises(ValueError, match="tau must be one of auto, direct, fft, pallas or an "
                     "integer"):
    options_lib.parse_tau(text)


@pytest.mark.parametrize("size,out_len", [(1, 1), (4, 3), (8, 8)])
def test_pallas_block_matches_middle_product(size, out_len):
  inputs, taps = _random_block(size, streams=2, batch=1, width=5, seed=size + 100)
  config = blocks.BlockConfig(((size, "pallas"),))
  out = jax.jit(lambda x, t: blocks.apply_block(config, x, t, {}, out_len))(inputs, taps)
  np.testing.assert_allclose(out, middle_product(inputs, taps, out_len), rtol=2e-5, atol=2e-5)


def test_auto_uses_pallas_only_with_a_measured_table():
  from lcsm_jax.decoding.strategies import Flash  # pylint: disable=g-import-not-at-top
  sizes = [1, 2, 4, 8, 16, 512]
  auto = options_lib.EngineOptions()
  no_table = Flash.from_options(auto, crossover=4, pallas_max=None)
  assert "pallas" not in {blocks.method_for(s, no_table.tau, no_table.pallas_max) for s in sizes}
  flash = Flash.from_options(auto, crossover=4, pallas_max=8)
  table = {s: blocks.method_for(s, flash.tau, flash.pallas_max) for s in sizes}
  assert table == {1: "pallas", 2: "pallas", 4: "pallas", 8: "pallas", 16: "fft", 512: "fft"}
  pallas = dict(blocks.block_config(sizes, "pallas").methods)
  assert pallas[16] == "pallas" and pallas[512] == "fft"


def test_crossover_cache_is_per_cpu_model(tmp_path, monkeypatch):
  """A crossover cached on another CPU model, or with other small-block transforms, is not used
  here; one cached here is."""
  from lcsm_jax.tuning import crossover as crossover_lib  # pylint: disable=g-import-not-at-top
  from lcsm_jax.tuning import machine  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("LCSM_JAX_CROSSOVER", raising=False)
  measured = []
  monkeypatch.setattr(crossover_lib, "measure_crossover",
                      lambda channels, *_: measured.append(channels) or {"crossover": 16})
  here = crossover_lib.cache_key(300)
  assert f"{machine.cpu_model()} x{machine.cpu_count()}|" in here and "channels<=512|" in here
  other = here.replace(machine.cpu_model(), "another CPU")
  stale = here.split("|dft_matmul")[0]  # written before small blocks transformed by matmul
  assert stale != here
  crossover_lib.cache_path().write_text(json.dumps({other: {"crossover": 2},
                                                    stale: {"crossover": 4}}))
  assert crossover_lib.crossover(300) == 16 and measured == [300]
  assert json.loads(crossover_lib.cache_path().read_text())[other] == {"crossover": 2}
  assert crossover_lib.crossover(300) == 16 and measured == [300]  # now read from the cache


@pytest.mark.parametrize("start", [-5, -1, 0, 3, 9, 14])
def test_filter_window_zero_fills_outside_the_taps(start):
  taps = np.arange(1, 13, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # (12, 3)
  expected = np.stack([taps[t] if 0 <= t < 12 else np.zeros(3, np.float32)
                       for t in range(start, start + 6)])
  traced = jax.jit(lambda t, s: blocks.filter_window(t, s, 6))(taps, start)
  np.testing.assert_array_equal(traced, expected)
  if 0 <= start <= 6:  # a static start inside the taps is a plain slice
    np.testing.assert_array_equal(blocks.filter_window(jnp.asarray(taps), start, 6), expected)
  # trailing axes sliced in the same read
  np.testing.assert_array_equal(
      jax.jit(lambda t, s: blocks.filter_window(t, s, 6, (1,), (2,)))(taps, start),
      expected[:, 1:3])


@pytest.mark.parametrize("distances", [1, 3])
def test_window_spectra_are_the_filter_windows_spectra(distances):
  rng = np.random.default_rng(distances)
  taps = rng.standard_normal((21, 2, 3)).astype(np.float32)
  size = 4
  spectra = blocks.window_spectra(jnp.asarray(taps), size, distances)
  chex.assert_shape(spectra, (distances, 2, 3, size + 1))
  padded = np.concatenate([taps, np.zeros((16, 2, 3), np.float32)])
  for d in range(1, distances + 1):
    window = padded[(d - 1) * size:(d + 1) * size]
    np.testing.assert_allclose(spectra[d - 1], np.fft.rfft(np.moveaxis(window, 0, -1)),
                               rtol=1e-5, atol=1e-5)
