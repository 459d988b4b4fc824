"""Facts about the machine the numbers were measured on: processor, CPU model, cores, memory,
software versions, the process's peak resident set and the memory read bandwidth."""

from __future__ import annotations

import os
import platform
import resource
from typing import Any

import jax
import jax.numpy as jnp

from lcsm_jax.decoding import memory as memory_lib
from lcsm_jax.tuning import machine as machine_lib
from lcsm_jax.tuning.timing import median_seconds

# A store from another machine (any of these differ) is set aside, not mixed with new points.
MACHINE_KEYS = ("processor", "cpu_model", "cpus", "jax", "backend", "device")


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {"processor": platform.processor() or platform.machine(),
          "cpu_model": machine_lib.cpu_model(), "cpus": os.cpu_count(),
          "cpus_used": cpus_used(),
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "memory_bytes": total_memory_bytes()}


def cpus_used() -> int | None:
  """The CPUs this process may run on (fewer than `os.cpu_count()` under `taskset`): XLA:CPU
  sizes its thread pool by them."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count()


def total_memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def available_memory_bytes() -> int | None:
  """Memory free for a run now (`lcsm_jax.decoding.memory.available_bytes`: on the CPU the
  host's MemAvailable, lowered to a cgroup limit; None where unknown)."""
  return memory_lib.available_bytes()[0]


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (the machine is shared), rounded to 0.01."""
  return [round(x, 2) for x in os.getloadavg()]


def max_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes per second of a jitted sum over a float32 array of `megabytes` (the roofline)."""
  x = jnp.ones((megabytes * (1 << 20) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds, _ = median_seconds(lambda: total(x), repeats)
  return x.nbytes / seconds


def fits_in_memory(peak_bytes: int, fraction: float) -> tuple[bool, str]:
  """Whether `peak_bytes` fit in `fraction` of the memory available now, and why (or not)."""
  available = available_memory_bytes()
  if available is None:
    return True, f"needs {peak_bytes / 2**30:.1f} GiB (available memory unknown)"
  ok = peak_bytes <= fraction * available
  return ok, (f"needs {peak_bytes / 2**30:.1f} GiB by XLA's estimate, "
              f"{available / 2**30:.1f} GiB available (limit {fraction:.0%})")
