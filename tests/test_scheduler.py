"""`lcsm_jax.tuning.scheduler`: XLA:CPU's concurrency-optimized scheduler turned off for the
process through XLA_FLAGS, only before JAX starts and never over the user's own setting; and
the applications that choose it (`lcsm-generate`, `experiments.latency`); smooth='auto'
follows it."""

import io
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from experiments import latency
from lcsm_jax.decoding import options as options_lib
from lcsm_jax.decoding import strategies
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.session import Session
from lcsm_jax.decoding.strategies.flash import Flash
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.cli import generate
from lcsm_jax.tuning import scheduler

ROOT = pathlib.Path(__file__).parent.parent
OFF = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@pytest.fixture
def no_xla_flags(monkeypatch):
  """XLA_FLAGS unset during the test and restored after it, also when the code under test sets
  it (`monkeypatch.delenv` of an unset variable records nothing to undo)."""
  monkeypatch.setitem(os.environ, "XLA_FLAGS", "")
  monkeypatch.delenv("XLA_FLAGS")


@pytest.mark.parametrize("flags, expected", [
    ("", None),
    ("--xla_force_host_platform_device_count=4", None),
    (OFF, False),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", True),
    ("--xla_cpu_enable_concurrency_optimized_scheduler", True),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=0 --xla_dump_to=/tmp/x", False),
    (f"{OFF} --xla_cpu_enable_concurrency_optimized_scheduler=true", True),  # the last wins
])
def test_configured_reads_xla_flags(monkeypatch, flags, expected):
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert scheduler.configured() is expected


def test_too_late_once_jax_has_started(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  assert scheduler.backends_started()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  assert not scheduler.turn_off_concurrency_scheduler()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
  monkeypatch.setenv("XLA_FLAGS", OFF)  # XLA read it at the start: it holds
  assert scheduler.turn_off_concurrency_scheduler()


def test_the_users_setting_stands(monkeypatch):
  monkeypatch.setattr(scheduler, "backends_started", lambda: False)
  on = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  monkeypatch.setenv("XLA_FLAGS", on)
  assert not scheduler.turn_off_concurrency_scheduler()
  assert os.environ["XLA_FLAGS"] == on


def test_added_beside_other_flags_before_jax_starts(monkeypatch):
  monkeypatch.setattr(scheduler, "backends_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", " --xla_force_host_platform_device_count=2 ")
  assert scheduler.turn_off_concurrency_scheduler()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OFF}"
  monkeypatch.delenv("XLA_FLAGS")
  assert scheduler.turn_off_concurrency_scheduler()
  assert os.environ["XLA_FLAGS"] == OFF


def test_a_fresh_process_runs_with_the_flag():
  """XLA aborts on a flag it does not know: this jaxlib knows this one, and reads it."""
  code = ("import os, jax, jax.numpy as jnp\n"
          "from lcsm_jax.tuning import scheduler\n"
          "assert not scheduler.backends_started()\n"
          "assert scheduler.turn_off_concurrency_scheduler()\n"
          "print(os.environ['XLA_FLAGS'])\n"
          "print(float(jax.jit(lambda x: jnp.fft.rfft(x).real.sum())(jnp.ones(64))))\n"
          "assert scheduler.backends_started()\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split("\n")[:2] == [OFF, "64.0"]


@pytest.mark.parametrize("smooth", ["auto", True, False])
def test_generate_turns_it_off_or_says_why_not(monkeypatch, no_xla_flags, smooth):
  """lcsm-generate turns the scheduler off quietly before JAX starts, whatever --smooth says;
  when JAX already runs, only an explicit --smooth is told that it is too late."""
  err = io.StringIO()
  generate._prefer_sequential_scheduler(smooth, err)  # JAX runs in this process: too late
  assert ("JAX has already started" in err.getvalue()) is (smooth is True)
  assert "XLA_FLAGS" not in os.environ
  monkeypatch.setattr(scheduler, "backends_started", lambda: False)
  err = io.StringIO()
  generate._prefer_sequential_scheduler(smooth, err)
  assert err.getvalue() == "" and os.environ["XLA_FLAGS"] == OFF
  generate._prefer_sequential_scheduler(smooth, err)  # XLA_FLAGS chooses now: unchanged
  assert err.getvalue() == "" and os.environ["XLA_FLAGS"] == OFF


@pytest.mark.parametrize("flags, smooth", [
    ("", False), (OFF, options_lib.SMOOTH_AUTO),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", False),
    (f"--xla_force_host_platform_device_count=1 {OFF}", options_lib.SMOOTH_AUTO)])
def test_smooth_auto_follows_the_scheduler(monkeypatch, flags, smooth):
  """smooth='auto' (the default) smooths above 64 positions where the scheduler is off, as
  sessions and flash strategies see it; explicit settings stay as given."""
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert EngineOptions().smooth == "auto"
  assert EngineOptions().resolved().smooth == smooth
  assert Flash(EngineOptions(tau=1)).options.smooth == smooth
  assert strategies.create("flash", EngineOptions()).options.smooth == smooth
  for given in (False, True, 16):
    assert EngineOptions(smooth=given).resolved().smooth is given
  stack = ConvStack(num_layers=1, width=2, l_max=32)
  session = Session(stack.init(jax.random.key(0)), stack, "flash", options=EngineOptions(tau=1))
  assert session.options.smooth == smooth
  assert session.engine(1).strategy.options.smooth == smooth


@pytest.mark.parametrize("setting, smooth, turned_off", [
    ("auto", [False], False), ("auto", [False, 64], True), ("auto", [True], True),
    ("on", [False, True], False), ("off", [False], True)])
def test_latency_chooses_the_scheduler(monkeypatch, no_xla_flags, setting, smooth, turned_off):
  monkeypatch.setattr(scheduler, "backends_started", lambda: False)
  latency.choose_scheduler(setting, smooth)
  assert os.environ.get("XLA_FLAGS") == (OFF if turned_off else None)
