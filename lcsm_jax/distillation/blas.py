"""Run NumPy's LAPACK single-threaded while the fit's many small decompositions run.

Measured on this project's 2-core machine: once the JAX CPU runtime has run anything, 128
batched 256 x 256 `numpy.linalg.eigh` calls took 15.5 s with OpenBLAS's default threads and
0.94 s with one thread (the BLAS threads and XLA's thread pool contend for the two cores). The
fit's matrices are small, so one thread loses nothing. This sets the thread count of every
OpenBLAS loaded in the process (NumPy's and SciPy's bundled copies) through its C API for the
duration of a `with` block and restores it after; where no OpenBLAS is found it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator

_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads"))
_LOCK = threading.RLock()


def _loaded_openblas() -> list[tuple]:
  """(get, set) C functions of every OpenBLAS mapped into this process (Linux only)."""
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f
               if "openblas" in os.path.basename(line.split()[-1]).lower()}
  except (OSError, IndexError):
    return []
  found = []
  for path in sorted(paths):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for get, put in _NAMES:
      if hasattr(lib, get) and hasattr(lib, put):
        found.append((getattr(lib, get), getattr(lib, put)))
        break
  return found


@contextlib.contextmanager
def threads(count: int = 1) -> Iterator[None]:
  """Limit OpenBLAS to `count` threads inside the block."""
  with _LOCK:
    libs = _loaded_openblas()
    saved = [int(get()) for get, _ in libs]
    for _, put in libs:
      put(ctypes.c_int(count))
    try:
      yield
    finally:
      for (_, put), n in zip(libs, saved):
        put(ctypes.c_int(n))
