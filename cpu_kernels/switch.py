"""A tracing-time switch for callers whose programs XLA partitions over a device mesh.

XLA's SPMD partitioner does not split a custom call: it gathers the call's sharded operands
onto every device (for channel-sharded weights inside a token loop, a gather of the weights at
every token), while it splits an XLA dot and reduces its small result. Code traced on a mesh
therefore asks for the XLA path:

  with cpu_kernels.disabled():
    ...trace the step...          # enabled() is False here, in this thread

`enabled()` is read when a function is traced, so the context must surround the tracing (it
does nothing to a program already compiled). Code traced inside `jax.shard_map` sees each
device's own shards, which nothing partitions, and may use the kernels again:

  with cpu_kernels.on_local_shards():
    ...trace the per-shard function...   # enabled() is True again, even inside disabled()
"""

from __future__ import annotations

import contextlib
import threading

_local = threading.local()


@contextlib.contextmanager
def disabled():
  """Within this context (in this thread), `enabled()` is False. Nests."""
  _local.depth = getattr(_local, "depth", 0) + 1
  try:
    yield
  finally:
    _local.depth -= 1


@contextlib.contextmanager
def on_local_shards():
  """Within this context (in this thread), `enabled()` is True, even inside `disabled()`: for
  functions traced inside `jax.shard_map`, whose operands are one device's shards."""
  depth = getattr(_local, "depth", 0)
  _local.depth = 0
  try:
    yield
  finally:
    _local.depth = depth


def enabled() -> bool:
  """False inside `disabled()`; callers then keep their XLA path."""
  return getattr(_local, "depth", 0) == 0
