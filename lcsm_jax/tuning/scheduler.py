"""XLA:CPU's concurrency-optimized scheduler: an application's process-wide choice.

XLA:CPU (on by default) schedules a program so that independent operations can run at once on
its runtime's threads. In flash's smoothed token loop that spreads one chain of transforms over
both cores of a small machine, and a transform on the other core than the one that wrote its
input reads it from that core's cache: on two cores the smoothed schedule's total rose from
1.16x the plain one's (one core) to 1.38x; with the scheduler off it was 1.20-1.23x, and the
plain schedule was no slower (README, "Smoothed latency").

XLA reads the choice from XLA_FLAGS once, when JAX starts its backends, for every program of
the process; jaxlib 0.10.2 accepts the same key as a per-program compiler option and ignores it.
So the library cannot make it for its own programs: applications do, before JAX starts
(`lcsm-generate`, for every run; `experiments.latency`). `EngineOptions.smooth='auto'`, the
default, smooths where it is off.
"""

from __future__ import annotations

import os
import re

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
_SETTING = re.compile(rf"--{FLAG}(?:=(\S*))?")


def configured() -> bool | None:
  """The scheduler's setting in XLA_FLAGS (the last one given), None when XLA_FLAGS does not
  name it (XLA's default: on)."""
  settings = _SETTING.findall(os.environ.get("XLA_FLAGS", ""))
  if not settings:
    return None
  return settings[-1].lower() not in ("false", "0")


def backends_started() -> bool:
  """Whether JAX has started its backends (and XLA has read XLA_FLAGS)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  # private: JAX has no public way to ask; without it, assume it is too late to choose
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return True if started is None else bool(started())


def turn_off_concurrency_scheduler() -> bool:
  """Turns XLA:CPU's concurrency-optimized scheduler off for this process by adding
  `--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS, unless XLA_FLAGS
  already chooses (the user's choice stands) or JAX has already started its backends (too late:
  nothing changes). Returns whether the process runs with the scheduler off."""
  chosen = configured()
  if chosen is not None:
    return not chosen
  if backends_started():
    return False
  os.environ["XLA_FLAGS"] = " ".join(
      part for part in (os.environ.get("XLA_FLAGS", "").strip(), f"--{FLAG}=false") if part)
  return True
