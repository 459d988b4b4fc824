"""Facts about the machine that measurements are keyed by."""

from __future__ import annotations

import pathlib
import platform


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
