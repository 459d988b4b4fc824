"""Distilled filters on disk: the own format's distilled section (bound to its weights and
config) and the StripedHyena per-stream files."""

import json
import shutil
import warnings

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import io
from lcsm_jax import models
from lcsm_jax.distillation import DistillationWarning, distill
from lcsm_jax.errors import CheckpointError
from lcsm_jax.models.hyena import HyenaConfig, init_params

CONFIG = HyenaConfig(vocab_size=13, d_model=8, n_layer=2, d_inner=16, l_max=64, order=3,
                     filter_order=8, emb_dim=3)


@pytest.fixture(scope="module")
def model():
  params = init_params(CONFIG, jax.random.key(0))
  with warnings.catch_warnings():  # random filters are not low order: the fit warns
    warnings.simplefilter("ignore", DistillationWarning)
    return params, distill(params, CONFIG, order=4)


def _same(a, b):
  for x, y in ((a.filters.poles, b.filters.poles), (a.filters.residues, b.filters.residues),
               (a.filters.h0, b.filters.h0), (a.skip, b.skip)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_distilled_filters_are_saved_with_the_model(tmp_path, model):
  params, distilled = model
  lcsm_jax.save_params(tmp_path, CONFIG, params, distilled=distilled)
  assert io.has_distilled(tmp_path)
  loaded = io.load_distilled(tmp_path)
  _same(loaded, distilled)
  assert loaded.report["overall"] == json.loads(json.dumps(distilled.report["overall"],
                                                           default=float))
  lcsm_jax.save_params(tmp_path, CONFIG, params)  # re-saved without: the section is removed
  assert not io.has_distilled(tmp_path) and io.load_distilled(tmp_path) is None


def test_a_distilled_section_of_other_weights_is_refused(tmp_path, model):
  params, distilled = model
  other = init_params(CONFIG, jax.random.key(1))
  lcsm_jax.save_params(tmp_path / "a", CONFIG, params, distilled=distilled)
  lcsm_jax.save_params(tmp_path / "b", CONFIG, other)
  shutil.copy(tmp_path / "a" / "distilled.safetensors", tmp_path / "b")
  with pytest.raises(CheckpointError, match="distilled from another model: its recorded "
                     "params.safetensors SHA-256"):
    io.load_distilled(tmp_path / "b")


def test_distilled_filters_of_another_shape_are_refused(tmp_path, model):
  params, distilled = model
  wider = CONFIG.replace(d_model=16, d_inner=32)
  with pytest.raises(CheckpointError, match=r"distilled filters have poles \(4, 8, 2\).*needs "
                     r"\(S, D\) = \(4, 16\)"):
    lcsm_jax.save_params(tmp_path, wider, init_params(wider, jax.random.key(0)),
                         distilled=distilled)
  with pytest.raises(TypeError, match="distilled must be the result of lcsm_jax.distill"):
    lcsm_jax.save_params(tmp_path, CONFIG, params, distilled=distilled.filters)


def test_stripedhyena_files_round_trip(tmp_path, model):
  params, distilled = model
  written = io.export_stripedhyena(tmp_path, distilled)
  assert sorted(p.name for p in written)[:3] == ["approx_poles_1.npy", "approx_poles_2.npy",
                                                 "approx_poles_3.npy"]
  poles_1 = np.load(tmp_path / "approx_poles_1.npy")
  assert poles_1.shape == (2, 8) and poles_1.dtype == np.complex64  # (N/2, D) per stream
  back = io.import_stripedhyena(tmp_path, distilled.skip)
  np.testing.assert_allclose(np.asarray(back.taps(64)), np.asarray(distilled.filters.taps(64)),
                             rtol=1e-5, atol=1e-6)
  # StripedHyena materialised by hand: h[0] = D + Re sum R_sh, h[t] = Re sum R_sh p^t
  p = np.load(tmp_path / "approx_poles_2.npy").astype(np.complex128)
  r = np.load(tmp_path / "approx_residues_2.npy").astype(np.complex128)
  d = np.load(tmp_path / "approx_skip_2.npy").astype(np.float64)
  t = np.arange(10)[:, None, None]
  taps = (r[None] * p[None] ** t).real.sum(1)
  taps[0] += d
  model_taps, diagonal = models.online_model(CONFIG).filters(params, 10)
  want = np.array(distilled.filters.taps(10))[:, 1]
  want[0] = np.asarray(diagonal)[1]  # StripedHyena's tap 0 includes the skip term
  np.testing.assert_allclose(taps, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(CheckpointError, match="files of stream 1 missing"):
    io.import_stripedhyena(tmp_path / "nowhere", distilled.skip)
