"""Shared test fixtures: the HyenaDNA reference fixture, the slow-test switch, and the release of
compiled programs when the process holds too many of them."""

import os
import pathlib

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax.decoding import memory

# JAX's backends start here, before any test: a command-line run inside a test (lcsm-generate
# turns XLA:CPU's concurrency-optimized scheduler off through XLA_FLAGS before JAX starts) then
# never changes the process's XLA_FLAGS, which EngineOptions.smooth='auto' reads.
jax.devices()

# A copy of ../shared/fixtures/hyenadna_tiny (see tests/fixtures/README.md), so CI needs nothing
# outside the repository.
FIXTURE_DIR = pathlib.Path(
    os.environ.get("LCSM_FIXTURE_DIR", pathlib.Path(__file__).parent / "fixtures" / "hyenadna_tiny"))


def pytest_collection_modifyitems(config, items):
  if os.environ.get("LCSM_RUN_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: set LCSM_RUN_SLOW=1 to run")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_dir():
  assert (FIXTURE_DIR / "config.json").exists(), f"reference fixture missing at {FIXTURE_DIR}"
  return FIXTURE_DIR


@pytest.fixture(scope="session")
def fixture_reference(fixture_dir):
  with np.load(fixture_dir / "reference.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def _no_x64_leak():
  """Tests that need float64 enable it in a `jax.enable_x64(True)` block; it must not leak."""
  assert not jax.config.jax_enable_x64, "jax_enable_x64 was left on by an earlier test"
  yield
  assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 on"


@pytest.fixture(autouse=True)
def _no_xla_flags_leak():
  """XLA_FLAGS chooses XLA:CPU's scheduler, which EngineOptions.smooth='auto' follows: a test
  that changes it (to try `tuning.scheduler`) must restore it."""
  before = os.environ.get("XLA_FLAGS")
  yield
  assert os.environ.get("XLA_FLAGS") == before, "this test changed XLA_FLAGS and left it so"


# Each compiled XLA:CPU program keeps its code in memory mappings of its own; a pytest-xdist
# worker that runs half the suite compiles thousands of programs and reached the kernel's limit
# (vm.max_map_count, 65530), where XLA's compiler crashed with a segmentation fault. Well below it:
_MAX_MAPPINGS = 20_000


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """After a test, if the process holds more than _MAX_MAPPINGS mappings, the library's and
  JAX's compiled programs are forgotten (later tests compile theirs anew)."""
  yield
  counts = memory.memory_mappings()
  if counts is not None and counts[0] > _MAX_MAPPINGS:
    lcsm_jax.clear_caches()
