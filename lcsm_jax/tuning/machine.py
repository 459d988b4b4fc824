"""Facts about the machine that measurements are keyed by."""

from __future__ import annotations

import os
import pathlib
import platform

import jax


def cpu_model() -> str:
  """The CPU's name ("model name" in /proc/cpuinfo), else the platform's processor: a cache
  or a result measured on one CPU must not be read on another."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_count() -> int:
  """The CPUs this process may run on (its affinity: `taskset` lowers it)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def device_key() -> str:
  """The backend and device a measurement was made on: on CPU the CPU model and the CPUs this
  process may use (XLA:CPU spreads some operations over them, not others, so one core and two
  can rank the same programs differently), else the device kind; and XLA_FLAGS when set (XLA's
  scheduler flags change which programs run fastest)."""
  device = jax.devices()[0]
  key = (f"cpu|{cpu_model()} x{cpu_count()}" if device.platform == "cpu"
         else f"{jax.default_backend()}|{device.device_kind}")
  flags = os.environ.get("XLA_FLAGS", "").strip()
  return f"{key}|XLA_FLAGS={flags}" if flags else key
