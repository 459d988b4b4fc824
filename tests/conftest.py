"""Shared test fixtures: the HyenaDNA reference fixture and the slow-test switch."""

import os
import pathlib

import numpy as np
import pytest

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
