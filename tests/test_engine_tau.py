"""tau='auto' resolved per session (`lcsm_jax.tuning.engine_tau`): which sessions time the
engine, the mapping between taus and crossovers, the cache, and a real timing on a small stack."""

import json

import jax
import numpy as np
import pytest

from lcsm_jax.decoding import EngineOptions, Rollout
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.tuning import crossover as crossover_lib
from lcsm_jax.tuning import engine_tau
from lcsm_jax.tuning import machine


@pytest.fixture
def fake_measurements(tmp_path, monkeypatch):
  """Both measurements replaced by recorders: the binary crossover 2, the engine's tau 16."""
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("LCSM_JAX_CROSSOVER", raising=False)
  calls = {"binary": [], "engine": []}

  def binary(channels, *_):
    calls["binary"].append(channels)
    return {"crossover": 2}

  def engine(streams, batch, width, base, smooth, taus, length):
    calls["engine"].append((streams, batch, width, base, smooth, tuple(taus), length))
    return {"tau": 16, "crossover": (base - 1) * 16}

  monkeypatch.setattr(crossover_lib, "measure_crossover", binary)
  monkeypatch.setattr(engine_tau, "measure", engine)
  return calls


@pytest.mark.parametrize("base, sizes", [(4, [1, 4, 16, 64]), (8, [1, 8]), (16, [1, 16])])
def test_candidates_and_their_crossovers_map_back(base, sizes):
  assert engine_tau.candidates(base) == sizes
  for size in sizes:
    assert crossover_lib.direct_limit(base, (base - 1) * size) == size
    assert crossover_lib.direct_limit(base, (base - 1) * size - 1) == max(size // base, 1)


def test_direct_limit_of_the_binary_tiling_is_the_crossover():
  assert [crossover_lib.direct_limit(2, c) for c in (0, 1, 5, 64)] == [0, 1, 5, 64]


def test_tuning_length_shrinks_with_channels_then_gives_up():
  assert engine_tau.tuning_length(2048) == 4096
  assert engine_tau.tuning_length(4096) == 2048
  assert engine_tau.tuning_length(8192) == 1024
  assert engine_tau.tuning_length(8193) is None


@pytest.mark.parametrize("base, max_length, sharded", [(2, 8192, False), (4, 4095, False),
                                                       (4, 8192, True)])
def test_sessions_that_use_the_binary_crossover(fake_measurements, base, max_length, sharded):
  options = EngineOptions(base=base)
  assert engine_tau.crossover(8, 1, 32, options, max_length, sharded=sharded) == 2
  assert fake_measurements == {"binary": [256], "engine": []}


def test_long_sessions_time_the_engine_once_per_shape_and_core_count(fake_measurements,
                                                                     monkeypatch):
  options = EngineOptions(base=4, smooth=64)
  assert engine_tau.crossover(8, 2, 32, options, 4096) == 3 * 16
  assert engine_tau.crossover(8, 2, 32, options, 1 << 14) == 3 * 16  # from the cache
  assert fake_measurements["engine"] == [(8, 2, 32, 4, 64, (1, 4, 16, 64), 4096)]
  assert fake_measurements["binary"] == []
  cached = json.loads(engine_tau.cache_path().read_text())
  (key,) = cached
  assert f"{machine.cpu_model()} x{machine.cpu_count()}|" in key and "|smooth=64|" in key
  cores = machine.cpu_count()
  monkeypatch.setattr(machine, "cpu_count", lambda: cores + 1)
  engine_tau.crossover(8, 2, 32, options, 4096)  # another core count: measured again
  engine_tau.crossover(8, 2, 16, options, 4096)  # another width: measured again
  assert len(fake_measurements["engine"]) == 3


def test_a_measurement_of_an_older_engine_is_measured_again(fake_measurements, monkeypatch):
  options = EngineOptions(base=4)
  engine_tau.crossover(8, 1, 32, options, 4096)
  (key,) = json.loads(engine_tau.cache_path().read_text())
  assert key.endswith(f"|engine={engine_tau.ENGINE_REVISION}")
  engine_tau.crossover(8, 1, 32, options, 4096)
  assert len(fake_measurements["engine"]) == 1
  monkeypatch.setattr(engine_tau, "ENGINE_REVISION", engine_tau.ENGINE_REVISION + 1)
  engine_tau.crossover(8, 1, 32, options, 4096)
  assert len(fake_measurements["engine"]) == 2


def test_an_unwritable_cache_still_gives_the_measurement(fake_measurements, tmp_path,
                                                        monkeypatch):
  blocked = tmp_path / "a file, not a directory"
  blocked.write_text("")
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(blocked))
  assert engine_tau.crossover(8, 1, 32, EngineOptions(), 4096) == 3 * 16
  assert engine_tau.crossover(8, 1, 32, EngineOptions(), 4096) == 3 * 16
  assert len(fake_measurements["engine"]) == 2  # nothing cached: measured each time


def test_a_forced_crossover_skips_every_measurement(fake_measurements, monkeypatch):
  monkeypatch.setenv("LCSM_JAX_CROSSOVER", "40")
  assert engine_tau.crossover(8, 1, 32, EngineOptions(), 8192) == 40
  assert fake_measurements == {"binary": [], "engine": []}


def test_a_session_resolves_tau_auto_with_the_engine_timing(fake_measurements):
  stack = ConvStack(2, 4, 4096)
  rollout = Rollout(stack.init(jax.random.key(0)), stack, "flash", max_length=4096)
  assert rollout.engine(3).strategy.tau == 16
  assert fake_measurements["engine"] == [(2, 3, 4, 4, False, (1, 4, 16, 64), 4096)]
  short = Rollout(stack.init(jax.random.key(0)), stack, "flash", max_length=4095)
  assert short.engine(3).strategy.tau == crossover_lib.direct_limit(4, 2) == 1


def test_measure_times_every_candidate_and_picks_the_fastest(tmp_path, monkeypatch):
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path))
  result = engine_tau.measure(2, 1, 8, 4, False, [1, 4], length=80, rounds=2)
  seconds = result["median_seconds"]
  assert set(seconds) == {"1", "4"} and all(np.isfinite(t) and t > 0 for t in seconds.values())
  assert result["tau"] == min((1, 4), key=lambda tau: seconds[str(tau)])
  assert result["crossover"] == 3 * result["tau"]
