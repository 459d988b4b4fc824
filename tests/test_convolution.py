"""Causal long convolutions: FFT and direct against float64 NumPy references, fft_length."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import convolution
from lcsm_jax.convolution import (causal_conv_direct, causal_conv_fft, causal_conv_numpy,
                                  fft_length, long_convolution)

# Jitted: one compilation per shape instead of one per operation (the tests stay fast).
CONVOLUTIONS = {"fft": jax.jit(causal_conv_fft), "direct": jax.jit(causal_conv_direct)}


def _np_convolve_reference(u, h):
  """Causal convolution through `np.convolve`, one channel (and batch row) at a time."""
  u = np.asarray(u, np.float64)
  h = np.asarray(h, np.float64)
  length = u.shape[-2]
  flat = u.reshape(-1, length, u.shape[-1])
  y = np.zeros_like(flat)
  for b in range(flat.shape[0]):
    for c in range(flat.shape[2]):
      y[b, :, c] = np.convolve(flat[b, :, c], h[:length, c])[:length]
  return y.reshape(u.shape)


def _random(rng, batch_shape, length, channels, taps=None):
  u = rng.standard_normal(batch_shape + (length, channels))
  h = rng.standard_normal((length if taps is None else taps, channels))
  return u, h


def _rel_err(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16])
def test_numpy_reference_equals_np_convolve(length):
  rng = np.random.default_rng(length)
  u, h = _random(rng, (2, 3), length, 4, taps=length + 5)
  np.testing.assert_allclose(causal_conv_numpy(u, h), _np_convolve_reference(u, h),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["fft", "direct"])
@pytest.mark.parametrize("length", [1, 2, 3, 100, 1000, 1024])
def test_float32_matches_numpy(name, length):
  rng = np.random.default_rng(1000 + length)
  u, h = _random(rng, (2,), length, 3)
  want = causal_conv_numpy(u, h)
  got = CONVOLUTIONS[name](jnp.asarray(u, jnp.float32), jnp.asarray(h, jnp.float32))
  chex.assert_shape(got, u.shape)
  chex.assert_type(got, jnp.float32)
  # float32 round-off of a sum of up to 1024 terms (and of the FFT's O(log n) stages).
  assert _rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", ["fft", "direct"])
@pytest.mark.parametrize("length", [1, 3, 100, 1024])
def test_float64_matches_numpy(name, length):
  rng = np.random.default_rng(2000 + length)
  u, h = _random(rng, (), length, 2, taps=length + 3)
  want = causal_conv_numpy(u, h)
  with jax.enable_x64(True):
    got = CONVOLUTIONS[name](jnp.asarray(u), jnp.asarray(h))
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  assert _rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("name", ["fft", "direct"])
def test_longer_filter_gives_same_result(name):
  rng = np.random.default_rng(3)
  u, h = _random(rng, (2,), 50, 3, taps=77)
  conv = CONVOLUTIONS[name]
  long = conv(jnp.asarray(u, jnp.float32), jnp.asarray(h, jnp.float32))
  exact = conv(jnp.asarray(u, jnp.float32), jnp.asarray(h[:50], jnp.float32))
  np.testing.assert_array_equal(np.asarray(long), np.asarray(exact))
  assert _rel_err(long, causal_conv_numpy(u, h[:50])) <= 1e-5


def test_bfloat16_inputs_are_convolved_in_float32():
  rng = np.random.default_rng(4)
  u, h = _random(rng, (1,), 64, 4)
  u16, h16 = jnp.asarray(u, jnp.bfloat16), jnp.asarray(h, jnp.bfloat16)
  for conv in (causal_conv_fft, causal_conv_direct):  # not jitted: eager dtypes
    got = conv(u16, h16)
    chex.assert_type(got, jnp.float32)
    # The inputs are rounded to bfloat16; the convolution of those rounded values is float32.
    want = causal_conv_numpy(np.asarray(u16, np.float64), np.asarray(h16, np.float64))
    assert _rel_err(got, want) <= 1e-5


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    batch_shape=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    length=st.integers(1, 24),
    channels=st.integers(1, 5),
    extra_taps=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_small_shapes(batch_shape, length, channels, extra_taps, seed):
  rng = np.random.default_rng(seed)
  u, h = _random(rng, batch_shape, length, channels, taps=length + extra_taps)
  want = _np_convolve_reference(u, h)
  for conv in CONVOLUTIONS.values():
    got = conv(jnp.asarray(u, jnp.float32), jnp.asarray(h, jnp.float32))
    chex.assert_shape(got, u.shape)
    assert _rel_err(got, want) <= 1e-5


def _smooth_numbers(limit):
  """All 2^a 3^b 5^c <= limit, by sieving instead of by construction."""
  out = []
  for m in range(1, limit + 1):
    r = m
    for p in (2, 3, 5):
      while r % p == 0:
        r //= p
    if r == 1:
      out.append(m)
  return np.array(out)


def test_fft_length_is_the_smallest_smooth_number_at_least_n():
  smooth = _smooth_numbers(4096)
  for n in range(1, 2049):
    want = int(smooth[np.searchsorted(smooth, n)])
    assert fft_length(n) == want, n


@pytest.mark.parametrize("n", [0, -3])
def test_fft_length_rejects_non_positive(n):
  with pytest.raises(ValueError, match="n >= 1"):
    fft_length(n)


@pytest.mark.parametrize("conv", [causal_conv_fft, causal_conv_direct])
def test_shape_errors(conv):
  u = jnp.zeros((2, 10, 3))
  with pytest.raises(ValueError, match=r"filter must have shape \(taps, channels\)"):
    conv(u, jnp.zeros((10, 3, 1)))
  with pytest.raises(ValueError, match="does not match filter"):
    conv(u, jnp.zeros((10, 4)))
  with pytest.raises(ValueError, match="does not match filter"):
    conv(jnp.zeros((3,)), jnp.zeros((10, 3)))
  with pytest.raises(ValueError, match="filter has 9 taps, fewer than the sequence length 10"):
    conv(u, jnp.zeros((9, 3)))


def test_long_convolution_by_name():
  assert long_convolution("fft") is causal_conv_fft
  assert long_convolution("direct") is causal_conv_direct
  with pytest.raises(ValueError, match="unknown long convolution 'pallas'"):
    long_convolution("pallas")
  assert set(convolution.LONG_CONVOLUTIONS) >= {"fft", "direct"}


@pytest.mark.parametrize("channels,spectrum,limit,groups", [
    (256, 10, 10, 1), (256, 11, 10, 2), (256, 40, 10, 4), (6, 40, 10, 6), (7, 15, 10, 7),
    (12, 25, 10, 3)])
def test_channel_groups_are_the_fewest_that_fit(monkeypatch, channels, spectrum, limit, groups):
  monkeypatch.setattr(convolution, "SPECTRUM_GROUP_BYTES", limit)
  assert convolution.channel_groups(channels, spectrum) == groups


@pytest.mark.parametrize("batch_shape,length,channels", [((), 37, 6), ((2,), 50, 12),
                                                          ((2, 3), 33, 5)])
def test_channel_groups_give_the_same_convolution(monkeypatch, batch_shape, length, channels):
  """A spectrum over the limit is transformed a group of channels at a time, with the same
  result (against the float64 direct sum)."""
  rng = np.random.default_rng(length)
  u = rng.standard_normal(batch_shape + (length, channels)).astype(np.float32)
  h = (rng.standard_normal((length + 3, channels)) / np.sqrt(length)).astype(np.float32)
  expected = causal_conv_numpy(u, h)
  monkeypatch.setattr(convolution, "SPECTRUM_GROUP_BYTES", 1)  # one channel per group
  hlo = jax.jit(causal_conv_fft).lower(u, h).as_text()
  assert "while" in hlo
  out = jax.jit(causal_conv_fft)(u, h)
  chex.assert_shape(out, u.shape)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_a_stack_of_convolutions_keeps_few_spectra_alive():
  """Each filter's transform waits for its layer's input: XLA would otherwise transform every
  layer's filter first and keep all the spectra alive (10 spectra here without the
  dependence, 3 with it)."""
  length, channels, layers = 4096, 64, 8
  taps = jax.ShapeDtypeStruct((layers, length, channels), jnp.float32)
  x = jax.ShapeDtypeStruct((1, length, channels), jnp.float32)

  def stack(taps, x):
    for layer in range(layers):
      x = jnp.tanh(causal_conv_fft(x, taps[layer]))
    return x

  compiled = jax.jit(stack).lower(taps, x).compile()
  spectrum = (length + 1) * channels * 8
  assert compiled.memory_analysis().temp_size_in_bytes <= 4 * spectrum


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("batch_shape,length,channels,streams", [((), 37, 6, 3),
                                                                  ((2,), 50, 12, 2)])
def test_skip_and_stream_are_the_convolution_of_that_filter_plus_the_skip(
    monkeypatch, grouped, batch_shape, length, channels, streams):
  """causal_conv_fft(u, h, skip=, stream=) = the float64 direct sum with h[:, stream], plus
  u * skip; `convolve` gives the same through a convolution that does not fuse them."""
  rng = np.random.default_rng(length + streams)
  u = rng.standard_normal(batch_shape + (length, channels)).astype(np.float32)
  h = (rng.standard_normal((length + 5, streams, channels)) / np.sqrt(length)).astype(np.float32)
  skip = rng.standard_normal(channels).astype(np.float32)
  stream = streams - 1
  expected = causal_conv_numpy(u, h[:, stream]) + u.astype(np.float64) * skip
  if grouped:
    monkeypatch.setattr(convolution, "SPECTRUM_GROUP_BYTES", 1)  # one channel per group
  fused = jax.jit(lambda u, h, skip, s: causal_conv_fft(u, h, skip=skip, stream=s))
  assert ("while" in fused.lower(u, h, skip, stream).as_text()) == grouped
  tolerance = dict(rtol=1e-4, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_allclose(np.asarray(fused(u, h, skip, stream)), expected, **tolerance)
  for conv in (causal_conv_fft, causal_conv_direct):
    out = jax.jit(lambda u, h, skip, conv=conv: convolution.convolve(conv, u, h, skip,
                                                                     stream=stream))(u, h, skip)
    np.testing.assert_allclose(np.asarray(out), expected, **tolerance)
  two_d = jax.jit(lambda u, h, skip: causal_conv_fft(u, h, skip=skip))(u, h[:, stream], skip)
  np.testing.assert_allclose(np.asarray(two_d), expected, **tolerance)


def test_stream_filters_are_checked_like_plain_ones():
  u = np.zeros((1, 8, 4), np.float32)
  with pytest.raises(ValueError, match=r"filter must have shape \(taps, streams, channels\)"):
    causal_conv_fft(u, np.zeros((8, 4), np.float32), stream=0)
  with pytest.raises(ValueError, match="does not match filter"):
    causal_conv_fft(u, np.zeros((8, 2, 3), np.float32), stream=0)
  with pytest.raises(ValueError, match="fewer than the sequence length"):
    causal_conv_fft(u, np.zeros((7, 2, 4), np.float32), stream=1)


def test_grouped_convolution_with_skip_needs_no_second_input_or_filter_copy(monkeypatch):
  """In channel groups with the skip term fused, the working memory is a few of one group's
  spectra: no second array of the input's size (the result is written over it) and no copy
  of the stream's filter (read a group at a time from the 3-D filters). The input is donated,
  as the prefill's loop carry is."""
  length, channels, streams = 1 << 14, 64, 4
  monkeypatch.setattr(convolution, "SPECTRUM_GROUP_BYTES", (length + 1) * 8 * 4)  # 16 groups
  u = jax.ShapeDtypeStruct((1, length, channels), jnp.float32)
  h = jax.ShapeDtypeStruct((2 * length, streams, channels), jnp.float32)
  skip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  fused = jax.jit(lambda u, h, skip: causal_conv_fft(u, h, skip=skip, stream=1),
                  donate_argnums=0).lower(u, h, skip).compile()
  input_bytes = length * channels * 4
  assert fused.memory_analysis().temp_size_in_bytes < input_bytes
