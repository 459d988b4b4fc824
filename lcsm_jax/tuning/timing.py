"""Timing: the median wall time of a function after warm-up, and the time JAX spends compiling."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

_COMPILE_EVENTS = "/jax/core/compile/"


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1
                   ) -> tuple[float, list[float]]:
  """(median, all times) in seconds of `run()` over `repeats` >= 1 runs after `warmup` untimed
  runs; every run is ended by `jax.block_until_ready` on its result."""
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


class CompileTimer:
  """Sums the durations JAX records for tracing, lowering and compiling while active."""

  def __init__(self):
    self.seconds = 0.0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event.startswith(_COMPILE_EVENTS):
      self.seconds += duration

  def __enter__(self) -> "CompileTimer":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
