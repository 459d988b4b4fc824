"""Measuring, per machine, the largest block size for which the direct block beats the FFT block.

`crossover(channels, max_size)` times isolated blocks of the binary tiling: read from a JSON
cache when this backend, device (on CPU: CPU model and core count) and channel count were
measured before, else measured now (a few seconds) and cached in
`$LCSM_JAX_CACHE_DIR/crossover.json` (default `~/.cache/lcsm_jax`); set
`LCSM_JAX_CROSSOVER=<int>` to skip measuring altogether. `engine_tau.crossover` decides, per
session, whether this or a timing of the engine itself resolves tau='auto'.

On GPU and TPU, `tau='auto'` also reads the Pallas table that `experiments/pallas_crossover.py`
writes (`$LCSM_JAX_CACHE_DIR/pallas_crossover.json`, or the path in
`$LCSM_JAX_PALLAS_CROSSOVER`): block sizes up to its `crossover.pallas_max_U` use the Pallas
kernel. Tables measured in interpret mode, or on another backend, are ignored.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp

from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.tuning import cache as cache_lib
from lcsm_jax.tuning import machine
from lcsm_jax.tuning import timing

MAX_DIRECT_SIZE = 256  # above this the O(U^2) block never wins on any backend we know


def cache_path() -> pathlib.Path:
  return cache_lib.directory() / "crossover.json"


def cache_key(channels: int) -> str:
  """The cache's key for `channels`: backend and device (on CPU: CPU model and the CPUs this
  process may use), the channels rounded up to a power of two, and the block size up to which
  FFT blocks transform by matrix products (`blocks.MATMUL_DFT_MAX`: a crossover measured with
  other transforms is stale)."""
  bucket = 1 << max(channels - 1, 0).bit_length()  # channels rounded up to a power of two
  return f"{machine.device_key()}|channels<={bucket}|dft_matmul<={blocks_lib.MATMUL_DFT_MAX}"


def time_block(method: str, size: int, channels: int, repeats: int = 5) -> float:
  """Median seconds of one block of `size` over `channels` channels (after one warm-up run)."""
  config = blocks_lib.BlockConfig(((size, method),))
  key_a, key_t = jax.random.split(jax.random.key(size))
  inputs = jax.random.normal(key_a, (size, 1, 1, channels), jnp.float32)
  taps = jax.random.normal(key_t, (2 * size, 1, channels), jnp.float32)
  spectra = blocks_lib.spectra_for(taps, [size] if method == "fft" else [])
  run = jax.jit(lambda x, t, s: blocks_lib.apply_block(config, x, t, s, size))
  return timing.median_seconds(lambda: run(inputs, taps, spectra), repeats)[0]


def measure_crossover(channels: int, max_size: int = MAX_DIRECT_SIZE) -> dict:
  """Times direct and FFT blocks for U = 1, 2, 4, ... and returns the table and the crossover
  (the largest U below which direct was never slower than FFT)."""
  table, crossover, size = {}, 0, 1
  while size <= min(max_size, MAX_DIRECT_SIZE):
    direct, fft = time_block("direct", size, channels), time_block("fft", size, channels)
    table[size] = {"direct": direct, "fft": fft}
    if direct > fft:
      break
    crossover = size
    size *= 2
  return {"crossover": crossover, "per_block_size": table, "channels": channels}


def forced_crossover() -> int | None:
  forced = os.environ.get("LCSM_JAX_CROSSOVER")
  if forced is None:
    return None
  try:
    value = int(forced)
  except ValueError:
    value = -1
  if value < 0:
    raise ValueError(f"LCSM_JAX_CROSSOVER must be an integer block size >= 0, got {forced!r}.")
  return value


def crossover(channels: int, max_size: int = MAX_DIRECT_SIZE) -> int:
  """The direct/FFT crossover for blocks over `channels` channels on this machine: from
  LCSM_JAX_CROSSOVER, else from the cache, else measured now (a few seconds, logged) and
  cached."""
  forced = forced_crossover()
  if forced is not None:
    return forced
  entry = cache_lib.measured(cache_path(), cache_key(channels),
                             lambda: measure_crossover(channels, max_size),
                             f"the direct/FFT block crossover for {channels} channels")
  return int(entry["crossover"])


def direct_limit(base: int, crossover: int) -> int:
  """The largest block size that runs directly in a base-`base` tiling for `crossover`, the
  widest direct rectangle that beat the FFT: a direct event of base b > 2 reads b - 1 blocks
  of its group, so U = b^k runs directly when (b - 1) U <= crossover; base 2 runs every size
  up to the crossover directly."""
  if base == 2:
    return crossover
  size = 1
  while (base - 1) * size * base <= crossover:
    size *= base
  return size


def pallas_table_path() -> pathlib.Path:
  forced = os.environ.get("LCSM_JAX_PALLAS_CROSSOVER")
  return pathlib.Path(forced) if forced else cache_path().with_name("pallas_crossover.json")


def pallas_crossover() -> int | None:
  """Largest block size where the compiled Pallas kernel beat the XLA paths on this backend,
  from the table of `experiments/pallas_crossover.py`; None on CPU or without a valid table."""
  backend = jax.default_backend()
  path = pallas_table_path()
  if backend == "cpu" or not path.exists():
    return None
  try:
    table = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  if table.get("interpret", True) or table.get("backend") != backend:
    return None
  return int(table.get("crossover", {}).get("pallas_max_U", 0)) or None
