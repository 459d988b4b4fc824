"""lcsm_jax.distillation.distill end to end: recovery through the API, orders from a tolerance, the
report (checked against a float64 NumPy evaluation of the stored filters), bad input, warnings,
the shipped byte LM, the ConvStack, and (slow) every filter of the large-1m preset."""

import dataclasses
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax.distillation import METRICS, DistillationWarning, Distilled, distill, format_table
from lcsm_jax.models import online_model
from lcsm_jax.models.conv_stack import ConvStack


@dataclasses.dataclass(frozen=True)
class TapsModel:
  """An online-model stand-in whose filters are given taps: params {'taps' (T, S, D), 'skip'}."""
  max_length: int

  def filters(self, params, length):
    return params["taps"][:length], params["taps"][0] + params["skip"]


def modes(poles, residues, length):
  """float64 (length,) h[t] = Re sum R p^(t-1) for t >= 1, h[0] = 0."""
  t = np.arange(1, length)
  h = np.zeros(length)
  h[1:] = np.sum(np.asarray(residues)[None] * np.asarray(poles)[None] ** (t[:, None] - 1),
                 axis=1).real
  return h


def stored_taps(distilled, length):
  """float64 (length, S, D) of the stored complex64 filters, term by term in NumPy."""
  p = np.asarray(distilled.filters.poles, np.complex128)
  r = np.asarray(distilled.filters.residues, np.complex128)
  out = np.zeros((length,) + p.shape[:2])
  out[0] = np.asarray(distilled.filters.h0)
  for t in range(1, length):
    out[t] = np.sum(r * p ** (t - 1), axis=-1).real
  return out


def relative_l2(approx, taps):
  return np.linalg.norm(approx[1:] - taps[1:], axis=0) / np.linalg.norm(taps[1:], axis=0)


@pytest.fixture(scope="module")
def exact_case():
  """Two streams of three channels: stream 0 one damped pair, stream 1 three pairs."""
  length = 400
  rng = np.random.default_rng(0)
  taps = np.zeros((length, 2, 3))
  truth = []
  for d in range(3):
    p0 = np.asarray([0.9 * np.exp(0.5j + 0.1j * d)])
    r0 = np.asarray([1.0 + 0.5j * d])
    p1 = np.asarray([0.9, 0.85, 0.8]) * np.exp(1j * np.asarray([0.3, 1.2, 2.5]) + 0.05j * d)
    r1 = np.asarray([1.0, 1.0 - 1.0j, 0.5j + 0.2 * d])
    taps[:, 0, d] = modes(p0, r0, length)
    taps[:, 1, d] = modes(p1, r1, length)
    truth.append((p0, p1))
  taps[0] = rng.standard_normal((2, 3))
  params = {"taps": jnp.asarray(taps, jnp.float32),
            "skip": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}
  return TapsModel(length), params, np.asarray(params["taps"], np.float64), truth


def assert_poles_found(got, want, atol):
  for p in want:
    assert np.min(np.abs(got - p)) < atol, (p, got)


def test_distill_recovers_damped_exponentials(exact_case):
  model, params, taps, truth = exact_case
  with warnings.catch_warnings():
    warnings.simplefilter("error", DistillationWarning)
    out = distill(params, model, order=6)
  assert isinstance(out, Distilled) and out.order == 6
  assert out.filters.poles.shape == (2, 3, 3) and out.filters.poles.dtype == jnp.complex64
  for d, (p0, p1) in enumerate(truth):
    assert_poles_found(np.asarray(out.filters.poles[1, d]), p1, 1e-5)
    assert_poles_found(np.asarray(out.filters.poles[0, d]), p0, 1e-5)
  ref = stored_taps(out, taps.shape[0])
  err = relative_l2(ref, taps)
  assert err.max() < 1e-5, err
  np.testing.assert_allclose(out.report["per_filter"]["rel_l2"], err, rtol=1e-3, atol=1e-8)
  np.testing.assert_array_equal(np.asarray(out.filters.h0), taps[0].astype(np.float32))
  np.testing.assert_allclose(np.asarray(out.skip), np.asarray(params["skip"]), atol=1e-6)
  assert np.max(np.abs(np.asarray(out.poles))) < 1  # Distilled forwards the filters' arrays


def test_distill_tol_chooses_orders_per_filter(exact_case):
  model, params, taps, _ = exact_case
  out = distill(params, model, tol=1e-4)
  assert out.report["per_filter"]["order"] == [[2, 2, 2], [6, 6, 6]]
  assert out.order == 6 and out.report["settings"]["stored_order"] == 6
  poles = np.asarray(out.filters.poles)
  residues = np.asarray(out.filters.residues)
  assert np.all(poles[0, :, 1:] == 0) and np.all(residues[0, :, 1:] == 0)  # unused slots
  assert np.all(np.abs(poles[1]) > 0.5)
  assert relative_l2(stored_taps(out, taps.shape[0]), taps).max() < 1e-5
  assert out.report["overall"]["order"] == {"min": 2.0, "p50": 4.0, "p90": 6.0, "max": 6.0}


def test_distill_refinement_through_the_api():
  t = np.arange(300, dtype=np.float64)
  taps = np.stack([1 / (1 + t) ** 1.5, np.exp(-t / 40) * np.cos(0.2 * t + 1e-3 * t * t)], 1)
  params = {"taps": jnp.asarray(taps[:, None, :], jnp.float32), "skip": jnp.zeros((1, 2))}
  model = TapsModel(300)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DistillationWarning)
    plain = distill(params, model, order=4)
    refined = distill(params, model, order=4, refine_steps=200)
  before = np.asarray(plain.report["per_filter"]["rel_l2"])
  after = np.asarray(refined.report["per_filter"]["rel_l2"])
  assert np.all(after < 0.95 * before), (before, after)
  assert refined.report["settings"]["refine_steps"] == 200
  assert refined.report["timings_s"]["refine"] > 0 and plain.report["timings_s"]["refine"] == 0


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, r"exactly one of order= or tol=, got order=None and tol=None"),
    ({"order": 4, "tol": 0.1}, ValueError, r"exactly one of order= or tol=, got order=4"),
    ({"order": 3}, ValueError, r"order must be even .* got 3"),
    ({"order": 0}, ValueError, r"order must be >= 2, got 0"),
    ({"order": 4.0}, TypeError, r"order must be an integer, got 4\.0"),
    ({"order": 20}, ValueError,
     r"order 20 is above what the taps support: 40 taps give a 19 x 19 Hankel window"),
    ({"tol": 0}, ValueError, r"tol must be in \(0, 1\), got 0"),
    ({"tol": 1.0}, ValueError, r"tol must be in \(0, 1\), got 1\.0"),
    ({"tol": -0.5}, ValueError, r"tol must be in \(0, 1\), got -0\.5"),
    ({"tol": float("nan")}, ValueError, r"tol must be finite, got nan"),
    ({"order": 4, "length": 41}, ValueError, r"length 41 exceeds the model's max_length 40"),
    ({"order": 2, "length": 2}, ValueError, r"length must be >= 3 .* got 2"),
    ({"tol": 0.1, "max_order": 5}, ValueError, r"max_order must be even, got 5"),
    ({"order": 4, "max_modulus": 1.0}, ValueError, r"max_modulus must be in \(0, 1\), got 1\.0"),
    ({"order": 4, "refine_steps": -1}, ValueError, r"refine_steps must be >= 0, got -1"),
])
def test_distill_bad_input(kwargs, error, match):
  params = {"taps": jnp.ones((40, 1, 2)), "skip": jnp.zeros((1, 2))}
  with pytest.raises(error, match=match):
    distill(params, TapsModel(40), **kwargs)


def test_distill_unknown_config():
  with pytest.raises(TypeError, match="known model family"):
    distill({}, {"d_model": 4}, order=2)


def test_distill_warns_when_the_spectrum_does_not_decay():
  rng = np.random.default_rng(1)
  params = {"taps": jnp.asarray(rng.standard_normal((200, 1, 3)), jnp.float32),
            "skip": jnp.zeros((1, 3))}
  with pytest.warns(DistillationWarning,
                    match=r"3 of 3 filters have relative l2 tap error above warn_error=0\.1 at "
                          r"order 2: achieved error up to 0\.9"):
    out = distill(params, TapsModel(200), order=2)
  assert min(out.report["per_filter"]["rel_l2"][0]) > 0.9
  with pytest.warns(DistillationWarning) as record:
    out = distill(params, TapsModel(200), tol=1e-6, max_order=4)
  messages = [str(w.message) for w in record]
  assert any(m.startswith("tol=1e-06 not reached within max_order=4 for 3 of 3 filters")
             for m in messages), messages
  assert out.report["per_filter"]["order"] == [[4, 4, 4]]


# --- models -------------------------------------------------------------------------------------


def test_distill_conv_stack():
  model = ConvStack(2, 8, 128)
  params = model.init(jax.random.key(0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DistillationWarning)
    out = distill(params, model, order=8)
  assert out.filters.poles.shape == (2, 8, 4)
  np.testing.assert_array_equal(np.asarray(out.filters.h0), np.asarray(params["taps"][:, 0]))
  np.testing.assert_allclose(np.asarray(out.skip), np.asarray(params["skip"]), atol=1e-6)
  taps = np.asarray(model.filters(params, 128)[0], np.float64)
  np.testing.assert_allclose(out.report["per_filter"]["rel_l2"],
                             relative_l2(stored_taps(out, 128), taps), rtol=1e-4)


@pytest.fixture(scope="module")
def byte_lm_distilled():
  config, params, _ = lcsm_jax.load_byte_lm()
  with pytest.warns(DistillationWarning, match="achieved error up to"):
    out = distill(params, config, order=16)
  return config, params, out


def test_byte_lm_distils_at_order_16(byte_lm_distilled):
  config, params, out = byte_lm_distilled
  streams, width = config.num_streams, config.d_model
  f = out.filters
  assert f.poles.shape == (streams, width, 8) and f.poles.dtype == jnp.complex64
  assert f.residues.shape == (streams, width, 8) and f.residues.dtype == jnp.complex64
  assert f.h0.shape == (streams, width) and f.h0.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(f.poles))) and np.all(np.isfinite(np.asarray(f.residues)))
  assert np.abs(np.asarray(f.poles)).max() < 1
  # h0 and skip from the per-layer computation agree with the adapter's all-layer filters
  taps, diagonal = online_model(config).filters(params, config.l_max)
  taps = np.asarray(taps, np.float64)
  np.testing.assert_allclose(np.asarray(f.h0), taps[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out.skip), np.asarray(diagonal) - taps[0], atol=1e-6)
  # the report's tap error is the stored filters' error (float64 NumPy, a few channels)
  ref = stored_taps(dataclasses.replace(out, filters=jax.tree.map(lambda x: x[:, :4], f)),
                    config.l_max)
  np.testing.assert_allclose(np.asarray(out.report["per_filter"]["rel_l2"])[:, :4],
                             relative_l2(ref, taps[:, :, :4]), rtol=1e-5)


def test_byte_lm_report_keys(byte_lm_distilled):
  config, _, out = byte_lm_distilled
  rep = out.report
  assert set(rep) == {"settings", "metrics", "per_filter", "per_stream", "overall", "timings_s"}
  assert set(rep["per_filter"]) == set(METRICS) == set(rep["metrics"]) == set(rep["overall"])
  for name, values in rep["per_filter"].items():
    arr = np.asarray(values, np.float64)
    assert arr.shape == (config.num_streams, config.d_model), name
    assert np.all(np.isfinite(arr)), name
  assert len(rep["per_stream"]) == config.num_streams
  for row in rep["per_stream"]:
    assert set(row) == {"stream", "layer"} | set(METRICS)
    assert set(row["rel_l2"]) == {"min", "p50", "p90", "max"}
    assert row["rel_l2"]["min"] <= row["rel_l2"]["p50"] <= row["rel_l2"]["p90"] <= \
        row["rel_l2"]["max"]
  assert rep["settings"]["order"] == 16 and rep["settings"]["length"] == config.l_max
  assert set(rep["timings_s"]) == {"filters", "fit", "refine", "report", "total"}
  assert json.loads(json.dumps(rep)) == rep
  table = format_table(rep)
  assert table == out.table()
  assert len(table.splitlines()) == 3 + config.num_streams + 1
  assert "rel_l2" in table and "hankel_bound" in table


@pytest.mark.slow
def test_large_1m_every_filter():
  """Every filter of large-1m (8 layers x 256 channels, 10^6 taps), random init, order 16."""
  config = lcsm_jax.preset("large-1m")
  params = lcsm_jax.init_params(config, jax.random.key(0))
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DistillationWarning)
    out = distill(params, config, order=16)
  seconds = time.perf_counter() - start
  assert out.filters.poles.shape == (8, 256, 8)
  assert np.all(np.isfinite(np.asarray(out.filters.poles)))
  assert np.all(np.isfinite(np.asarray(out.report["per_filter"]["rel_l2"])))
  assert np.abs(np.asarray(out.filters.poles)).max() < 1
  print(f"large-1m: {seconds:.1f} s", out.report["timings_s"])
  print(out.table())
