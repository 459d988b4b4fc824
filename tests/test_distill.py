"""The distillation's parts against independent references: ModalFilters.taps vs a float64 NumPy
evaluation, Hankel singular values vs numpy.linalg.svd of explicitly built Hankel matrices, order
selection on known spectra, exact recovery of sums of damped exponentials, refinement, and the
StripedHyena conversion checked by materialising both conventions' taps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax.distillation import fit, hankel, refine
from lcsm_jax.distillation.modal import ModalFilters, from_stripedhyena, powers, to_stripedhyena


def reference_taps(poles, residues, h0, length):
  """float64 (length, S, D): h[0] = h0, h[t] = Re sum R p^(t-1), term by term."""
  poles = np.asarray(poles, np.complex128)
  residues = np.asarray(residues, np.complex128)
  out = np.zeros((length,) + poles.shape[:2])
  out[0] = h0
  for t in range(1, length):
    out[t] = np.sum(residues * poles ** (t - 1), axis=-1).real
  return out


def random_filters(rng, streams=2, width=3, slots=4, low=0.3, high=0.97):
  mod = rng.uniform(low, high, (streams, width, slots))
  poles = mod * np.exp(1j * rng.uniform(-np.pi, np.pi, (streams, width, slots)))
  residues = rng.standard_normal(poles.shape) + 1j * rng.standard_normal(poles.shape)
  poles[0, 0, -1], residues[0, 0, -1] = 0, 0            # an unused slot
  poles[1, 2, 0], residues[1, 2, 0] = 0.8, 1.5 + 0.0j   # a real pole, real residue
  h0 = rng.standard_normal((streams, width))
  return poles, residues, h0


def as_modal(poles, residues, h0):
  return ModalFilters(jnp.asarray(poles, jnp.complex64), jnp.asarray(residues, jnp.complex64),
                      jnp.asarray(h0, jnp.float32))


def stored(filters):
  return (np.asarray(filters.poles, np.complex128), np.asarray(filters.residues, np.complex128),
          np.asarray(filters.h0, np.float64))


# --- ModalFilters -----------------------------------------------------------------------------


def test_modal_filters_shapes_and_order():
  poles, residues, h0 = random_filters(np.random.default_rng(0))
  f = as_modal(poles, residues, h0)
  assert (f.order, f.num_streams, f.width) == (8, 2, 3)
  leaves = jax.tree.leaves(f)
  assert len(leaves) == 3  # a pytree of its three arrays


@pytest.mark.parametrize("length", [1, 2, 3, 37, 1000])
def test_taps_match_float64_numpy(length):
  f = as_modal(*random_filters(np.random.default_rng(1)))
  ref = reference_taps(*stored(f), length)
  got = np.asarray(f.taps(length))
  assert got.shape == (length, 2, 3) and got.dtype == np.float32
  scale = np.abs(ref).max()
  err = np.abs(got - ref).max() / scale
  assert err < 2e-6, err
  np.testing.assert_array_equal(got[0], np.asarray(f.h0))


def test_taps_near_unit_circle_long():
  """Poles within 1e-4 of the unit circle over 2^16 taps: float64 taps of the stored poles agree
  with NumPy to 1e-12; float32 ones lose accuracy with t (documented), within 1e-4 here."""
  rng = np.random.default_rng(2)
  poles = (1 - 1e-4 * rng.uniform(0.5, 2, (1, 2, 3))) * np.exp(1j * rng.uniform(0, 0.01, (1, 2, 3)))
  residues = rng.standard_normal((1, 2, 3)) + 0j
  f = as_modal(poles, residues, np.zeros((1, 2)))
  p, r, _ = stored(f)
  t = np.arange(1, 1 << 16)
  ref = np.einsum("tsdn,sdn->tsd", p[None] ** (t[:, None, None, None] - 1), r).real
  got = np.asarray(jax.jit(lambda x: x.taps(1 << 16))(f))[1:]
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 1e-9 < err < 1e-4, err   # float32 (not silently float64)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(lambda x: x.taps(1 << 16, jnp.float64))(f))[1:]
  assert got.dtype == np.float64
  assert np.abs(got - ref).max() < 1e-12 * np.abs(ref).max()
  with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
    f.taps(4, jnp.float64)


def test_taps_float64_under_x64():
  poles, residues, h0 = random_filters(np.random.default_rng(3))
  with jax.enable_x64(True):
    f = ModalFilters(jnp.asarray(poles), jnp.asarray(residues), jnp.asarray(h0))
    got = np.asarray(f.taps(300))
  assert got.dtype == np.float64
  ref = reference_taps(poles, residues, h0, 300)
  assert np.abs(got - ref).max() < 1e-12 * np.abs(ref).max()


def test_powers_parallel_prefix():
  p = jnp.asarray([0.5 + 0.5j, 0.0, -0.9], jnp.complex64)
  got = np.asarray(powers(p, 5))
  ref = np.asarray(p, np.complex128)[None] ** np.arange(5)[:, None]
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="count >= 1"):
    powers(p, 0)


# --- Hankel singular values, window, order ---------------------------------------------------


def explicit_hankel(h, k):
  """H[i, j] = h[i + j + 1] for i, j < k, built entry by entry."""
  out = np.empty((k, k))
  for i in range(k):
    for j in range(k):
      out[i, j] = h[i + j + 1]
  return out


def test_hankel_singular_values_match_numpy_svd():
  rng = np.random.default_rng(4)
  taps = rng.standard_normal((101, 2, 3)) * np.exp(-np.arange(101) / 40)[:, None, None]
  sv = hankel.hankel_singular_values(taps, max_size=256)
  assert sv.shape == (2, 3, 50)
  for s in range(2):
    for d in range(3):
      ref = np.linalg.svd(explicit_hankel(taps[:, s, d], 50), compute_uv=False)
      np.testing.assert_allclose(sv[s, d], ref, rtol=1e-10, atol=1e-12 * ref[0])


def test_box_summed_window_matches_explicit_sums():
  """max_size 8 over 200 taps with no decay: 16 Hankel samples of ceil(199 / 16) = 13 taps,
  capped at 199 // 16 = 12; fit samples 4 times finer: 3 taps each (capped at 199 // 64), all 66
  complete boxes; each Hankel sample is the sum of 4 fit samples."""
  rng = np.random.default_rng(5)
  taps = rng.standard_normal((200, 1, 2))
  win = hankel.window(taps.reshape(200, 2), max_size=8, energy_tol=0.0)
  assert win.size == 8 and list(win.stride) == [3, 3] and list(win.ratio) == [4, 4]
  assert list(win.hankel_stride) == [12, 12] and list(win.effective) == [199, 199]
  assert win.samples.shape == (2, 66) and win.complete.all()
  for d in range(2):
    fine = [taps[1 + 3 * m:4 + 3 * m, 0, d].sum() for m in range(66)]
    np.testing.assert_allclose(win.samples[d], fine, rtol=1e-12)
    coarse = [taps[1 + 12 * m:13 + 12 * m, 0, d].sum() for m in range(16)]
    np.testing.assert_allclose(win.hankel[d], coarse, rtol=1e-12)
  sv = hankel.hankel_singular_values(taps, max_size=8, energy_tol=0.0)
  for d in range(2):
    g = np.asarray([taps[1 + 12 * m:13 + 12 * m, 0, d].sum() for m in range(16)])
    ref = np.linalg.svd(explicit_hankel(np.concatenate([[0.0], g]), 8), compute_uv=False)
    np.testing.assert_allclose(sv[0, d], ref, rtol=1e-10)


def test_window_without_decimation_covers_every_tap():
  """1024 taps, k = 256: the Hankel needs no box sums (stride 1) and the fit samples are all
  1023 taps, not only the Hankel's 512."""
  taps = np.random.default_rng(12).standard_normal((1024, 3))
  win = hankel.window(taps, max_size=256, energy_tol=0.0)
  assert list(win.stride) == [1, 1, 1] and list(win.hankel_stride) == [1, 1, 1]
  assert win.samples.shape == (3, 1023) and win.complete.all()
  np.testing.assert_array_equal(win.samples, taps[1:].T)
  np.testing.assert_array_equal(win.hankel, taps[1:513].T)


def test_effective_length_drops_the_tail():
  """h[t] = 0.5^t: the tail from n holds 0.25^n of the energy of h[1:] (relative to 0.25)."""
  t = np.arange(1, 200, dtype=np.float64)
  tail = (0.5 ** t)[:, None]
  n = hankel.effective_lengths(tail, 1e-6)[0]
  # tail energy after n taps: 0.25^n (relative); need 0.25^n <= 1e-6 -> n >= 9.97
  assert n == 10


def test_rank_one_spectrum_known():
  """h[t] = a^(t-1), t >= 1: H = v v^T with v = (a^i), sigma_1 = sum a^(2i), the rest 0."""
  a, k = 0.9, 40
  taps = np.concatenate([[1.0], a ** np.arange(2 * k + 10)])[:, None, None]
  sv = hankel.hankel_singular_values(taps, max_size=k, energy_tol=0.0)[0, 0]
  assert sv[0] == pytest.approx((1 - a ** (2 * k)) / (1 - a * a), rel=1e-12)
  assert sv[1] < 1e-12 * sv[0]


def test_select_order_and_bound_on_known_spectrum():
  sv = np.asarray([[1.0, 0.5, 0.1, 0.01, 0.001, 1e-4]])
  order, reached = hankel.select_order(sv, 0.05)    # sigma_4 / sigma_1 = 0.01 < 0.05: N = 3 -> 4
  assert order.tolist() == [4] and reached.tolist() == [True]
  assert hankel.select_order(sv, 0.2)[0].tolist() == [2]      # N = 2
  assert hankel.select_order(sv, 0.6)[0].tolist() == [2]      # N = 1, rounded up to 2
  assert hankel.select_order(sv, 1e-5)[0].tolist() == [6]     # sigma_7 counts as 0
  order, reached = hankel.select_order(sv, 1e-5, max_order=4)
  assert order.tolist() == [4] and reached.tolist() == [False]
  assert hankel.hankel_bound(sv, 2)[0] == pytest.approx(2 * (0.1 + 0.01 + 0.001 + 1e-4))
  assert hankel.hankel_bound(sv, np.asarray([6]))[0] == 0.0
  assert hankel.ratio_at(sv, np.asarray([4]))[0] == pytest.approx(0.001)
  with pytest.raises(ValueError, match=r"tol must be in \(0, 1\), got 0"):
    hankel.select_order(sv, 0)


# --- the fit ----------------------------------------------------------------------------------


def damped_exponentials(rng, filters, pairs, length, low=0.5, high=0.95):
  poles = rng.uniform(low, high, (filters, pairs)) * np.exp(
      1j * rng.uniform(0.1, np.pi - 0.1, (filters, pairs)))
  residues = rng.standard_normal(poles.shape) + 1j * rng.standard_normal(poles.shape)
  t = np.arange(1, length)
  taps = np.zeros((length, filters))
  taps[0] = rng.standard_normal(filters)
  taps[1:] = np.einsum("tfn,fn->tf", poles[None] ** (t[:, None, None] - 1), residues).real
  return taps, poles, residues


def closed_form(taps, order, max_size=256, energy_tol=1e-12):
  win = hankel.window(taps, max_size=max_size, energy_tol=energy_tol)
  values, vectors = hankel.hankel_eigh(win.hankel, win.size)
  orders = np.full(taps.shape[1], order)
  poles, residues = fit.fit_window(win, values, vectors, orders, order // 2, 1 - 1e-9)
  return poles, residues, win


def evaluate(poles, residues, length):
  t = np.arange(1, length)
  return np.einsum("tfn,fn->tf", poles[None] ** (t[:, None, None] - 1), residues).real


def assert_same_poles(got, want, atol):
  for f in range(want.shape[0]):
    for p in want[f]:
      assert np.min(np.abs(got[f] - p)) < atol, (f, p, got[f])


def test_fit_recovers_sum_of_damped_exponentials():
  taps, poles, residues = damped_exponentials(np.random.default_rng(6), 5, 3, 400)
  got_p, got_r, _ = closed_form(taps, 6)
  assert_same_poles(got_p, poles, 1e-9)
  err = np.linalg.norm(evaluate(got_p, got_r, 400) - taps[1:], axis=0)
  assert np.max(err / np.linalg.norm(taps[1:], axis=0)) < 1e-9


def test_fit_real_pole_takes_one_slot():
  """Order 4 for 0.9^(t-1) * 2 + a damped pair: ERA's 4 eigenvalues give 3 candidates (the real
  pole, the pair, a spurious one); the weakest is dropped and the real pole's residue is real."""
  t = np.arange(1, 300)
  p = 0.7 * np.exp(0.6j)
  taps = np.zeros((300, 1))
  taps[1:, 0] = 2 * 0.9 ** (t - 1) + (np.asarray(1 - 2j) * p ** (t - 1)).real
  got_p, got_r, _ = closed_form(taps, 4)
  assert_same_poles(got_p, np.asarray([[0.9, p]]), 1e-9)
  real = np.argmin(np.abs(got_p[0] - 0.9))
  assert got_r[0, real] == pytest.approx(2.0, abs=1e-9)
  assert got_r[0, real].imag == 0.0
  np.testing.assert_allclose(evaluate(got_p, got_r, 300), taps[1:], atol=1e-10)


def test_fit_long_smooth_filter_through_box_sums():
  """10^5 taps of slowly decaying, slowly turning modes: the window is box-summed (stride > 1)
  and the principal roots recover the full-rate poles."""
  rng = np.random.default_rng(7)
  length = 100_000
  poles = np.exp((-rng.uniform(1, 5, (3, 2)) + 1j * rng.uniform(1, 50, (3, 2))) / length)
  residues = rng.standard_normal((3, 2)) + 1j * rng.standard_normal((3, 2))
  t = np.arange(1, length)
  taps = np.zeros((length, 3))
  for f in range(3):
    taps[1:, f] = (residues[f] * poles[f][None] ** (t[:, None] - 1)).sum(-1).real
  got_p, got_r, win = closed_form(taps, 4, max_size=64)
  assert win.stride.min() > 1 and win.ratio.min() == 4
  assert_same_poles(got_p, poles, 1e-9)
  err = np.linalg.norm(evaluate(got_p, got_r, length) - taps[1:], axis=0)
  assert np.max(err / np.linalg.norm(taps[1:], axis=0)) < 1e-8


def test_fit_fir_term_is_a_used_pole_zero():
  """h[1] = 3 and nothing else: ERA's state matrix is 0, so the slot holds pole 0 (used) with
  residue 3; pole 0 is also how unused slots look, but their residue stays 0."""
  taps = np.zeros((64, 2))
  taps[1, 0] = 3.0
  taps[1:, 1] = 0.5 ** np.arange(63)
  poles, residues, _ = closed_form(taps, 2)
  assert poles[0, 0] == 0 and residues[0, 0] == pytest.approx(3.0, abs=1e-12)
  assert poles[1, 0] == pytest.approx(0.5, abs=1e-12)
  np.testing.assert_allclose(evaluate(poles, residues, 64), taps[1:], atol=1e-12)
  new_p, new_r = refine.refine(poles, residues, hankel.window(taps, max_size=256),
                               np.ones(poles.shape, bool), steps=5)
  np.testing.assert_allclose(evaluate(new_p, new_r, 64), taps[1:], atol=1e-12)


def test_poles_are_clipped_inside_the_unit_circle():
  taps = np.zeros((200, 1))
  taps[1:, 0] = np.cos(0.3 * np.arange(199))  # an undamped pair: |p| = 1
  win = hankel.window(taps, max_size=64)
  values, vectors = hankel.hankel_eigh(win.hankel, win.size)
  poles, _ = fit.fit_window(win, values, vectors, np.asarray([2]), 1, 0.999)
  assert np.abs(poles).max() == pytest.approx(0.999, abs=1e-12)


def test_refinement_lowers_the_error_of_a_power_law():
  """1 / (1 + t)^1.5 is not a finite sum of exponentials; ERA at order 4 leaves ~14% error on the
  window, Adam on poles and residues brings it well below."""
  t = np.arange(400, dtype=np.float64)
  taps = np.stack([1 / (1 + t) ** 1.5, np.exp(-t / 60) * np.cos(0.2 * t + 1e-3 * t * t)], 1)
  poles, residues, win = closed_form(taps, 4, max_size=128)
  before = fit.window_error(poles, residues, win)
  new_p, new_r = refine.refine(poles, residues, win, np.ones(poles.shape, bool), steps=300)
  after = fit.window_error(new_p, new_r, win)
  assert np.all(after < 0.9 * before), (before, after)
  assert after[0] < 0.5 * before[0]
  assert np.abs(new_p).max() < 1
  # the taps themselves (stride 1: the window is the taps) agree with the window error
  full = np.linalg.norm(evaluate(new_p, new_r, 400) - taps[1:], axis=0)
  np.testing.assert_allclose(full / np.linalg.norm(taps[1:], axis=0), after, rtol=1e-6)


# --- StripedHyena -----------------------------------------------------------------------------


def test_stripedhyena_round_trip_plain_arrays():
  poles, residues, h0 = random_filters(np.random.default_rng(8))
  f = as_modal(poles, residues, h0)
  skip = np.random.default_rng(9).standard_normal((2, 3)).astype(np.float32)
  sh_p, sh_r, d = to_stripedhyena(f, skip)
  assert sh_p.dtype == np.complex64 and sh_r.dtype == np.complex64 and d.dtype == np.float32
  p, r, h = stored(f)
  assert sh_r[0, 0, -1] == 0  # the unused slot
  np.testing.assert_allclose(sh_r, r / np.where(p == 0, 1, p) * (p != 0), rtol=1e-6)
  np.testing.assert_allclose(d, h + skip - (r / np.where(p == 0, 1, p) * (p != 0)).real.sum(-1),
                             rtol=1e-5, atol=1e-5)
  back = from_stripedhyena(sh_p, sh_r, d, skip)
  np.testing.assert_allclose(np.asarray(back.poles), np.asarray(f.poles), rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(back.residues), np.asarray(f.residues), rtol=3e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(back.h0), np.asarray(f.h0), atol=2e-5)


def test_stripedhyena_taps_agree_with_ours():
  """Materialise both conventions: ours h0 + skip at t = 0 and Re sum R p^(t-1) after; theirs
  D + Re sum R_sh p^t at t = 0 and Re sum R_sh p^t after (float64 NumPy)."""
  poles, residues, h0 = random_filters(np.random.default_rng(10))
  f = as_modal(poles, residues, h0)
  skip = np.random.default_rng(11).standard_normal((2, 3))
  sh_p, sh_r, d = to_stripedhyena(f, skip)
  ours = reference_taps(*stored(f), 60)
  ours[0] += skip
  p64, r64 = sh_p.astype(np.complex128), sh_r.astype(np.complex128)
  theirs = np.stack([np.sum(r64 * p64 ** t, -1).real for t in range(60)])
  theirs[0] += d
  np.testing.assert_allclose(theirs, ours, atol=1e-5 * np.abs(ours).max())


def test_from_stripedhyena_pole_zero_moves_into_h0():
  p = np.asarray([[[0.0, 0.5]]], np.complex64)
  r = np.asarray([[[2.0, 1.0]]], np.complex64)
  f = from_stripedhyena(p, r, np.asarray([[0.25]]), np.asarray([[0.5]]))
  # h0 = D + Re sum R_sh - skip = 0.25 + 3 - 0.5
  assert float(f.h0[0, 0]) == pytest.approx(2.75)
  assert complex(f.residues[0, 0, 0]) == 0
  assert complex(f.residues[0, 0, 1]) == pytest.approx(0.5)


def test_to_stripedhyena_refuses_fir_slot():
  f = as_modal(np.zeros((1, 1, 2)), np.asarray([[[0.0, 1.0]]]), np.zeros((1, 1)))
  with pytest.raises(ValueError, match="pole 0 with a nonzero residue"):
    to_stripedhyena(f, np.zeros((1, 1)))
  with pytest.raises(ValueError, match=r"skip has shape \(2,\)"):
    to_stripedhyena(f, np.zeros(2))
