"""Memory checks before a run: what the compiled programs and their live arrays need, against
what the device (or, on the CPU, the host) has free, so that a run that cannot fit is refused
before it starts instead of failing deep inside XLA after minutes of work.

Estimates come from XLA's own account of a compiled program (`memory_analysis()`: temporaries
and outputs, known before anything runs, even for shapes that would never fit) plus the bytes
of the arrays that stay alive beside it (parameters, filter tables), from their shapes only.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


class InsufficientMemoryError(ValueError):
  """A run whose estimated memory exceeds what is available (raised before it starts)."""


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf (arrays or `jax.ShapeDtypeStruct`s) of a pytree."""
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


@functools.lru_cache(maxsize=256)
def program_bytes(compiled: Any) -> int:
  """Bytes a compiled program allocates while it runs: temporaries plus outputs (outputs that
  alias donated arguments are not new memory). Cached per program: XLA's analysis takes ~10 ms,
  more than a short generation call."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)


HOST_READING_SECONDS = 1.0  # a reading of the host's available memory serves this long
_host_reading: tuple[float, int | None] | None = None  # (time.monotonic(), bytes)


def _host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo, lowered to the cgroup (v2) limit's headroom if tighter;
  read at most once per HOST_READING_SECONDS (a generation streamed one token per call checks
  at every call, and reading those files took ~80 us of a ~290 us call)."""
  global _host_reading
  now = time.monotonic()
  if _host_reading is None or now - _host_reading[0] >= HOST_READING_SECONDS:
    _host_reading = (now, _read_host_available_bytes())
  return _host_reading[1]


def _read_host_available_bytes() -> int | None:
  available = None
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        available = int(line.split()[1]) * 1024
        break
  except (OSError, ValueError):
    pass
  try:
    cgroup = pathlib.Path("/sys/fs/cgroup")
    limit = (cgroup / "memory.max").read_text().strip()
    if limit != "max":
      headroom = int(limit) - int((cgroup / "memory.current").read_text().strip())
      available = headroom if available is None else min(available, headroom)
  except (OSError, ValueError):
    pass
  return available


def memory_mappings() -> tuple[int, int] | None:
  """(mappings this process holds, the kernel's limit `vm.max_map_count`), None off Linux.

  Every compiled XLA:CPU program keeps its code in a few mappings of its own, so a process
  that keeps thousands of programs alive nears the limit; there XLA's compiler fails to map
  the next program and crashes the process."""
  try:
    with open("/proc/self/maps", "rb") as f:
      held = sum(1 for _ in f)
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
  except (OSError, ValueError):
    return None
  return held, limit


def available_bytes(device: jax.Device | None = None) -> tuple[int | None, str]:
  """(bytes free, where that figure comes from) on `device` (default: the first device).

  Accelerators report their allocator's limit minus what is in use; the CPU backend allocates
  from the host, whose available memory is read from the OS. None where nothing is known.
  """
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)),
              f"free memory of {device.device_kind}")
    return None, f"{device.device_kind} reports no memory limit"
  return _host_available_bytes(), "available memory of this host"


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  raise AssertionError  # unreachable


def check_fits(parts: Mapping[str, int], *, advice: str, limit: int | None = None,
               device: jax.Device | None = None) -> int:
  """Raises `InsufficientMemoryError` when the sum of `parts` exceeds the available memory.

  Args:
    parts: what the run needs, by name (e.g. {"parameters": ..., "generation program": ...}).
    advice: what the caller can reduce, appended to the message.
    limit: bytes available (default: `available_bytes(device)`; no check when unknown).
  Returns:
    The estimate in bytes.
  """
  needed = int(sum(parts.values()))
  source = "the given limit"
  if limit is None:
    limit, source = available_bytes(device)
  if limit is not None and needed > limit:
    detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
    raise InsufficientMemoryError(
        f"this run needs an estimated {format_bytes(needed)} ({detail}), more than the "
        f"{format_bytes(limit)} of {source}; {advice}")
  return needed
