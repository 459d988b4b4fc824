"""Flash's blocks timed as flash pays for them: `count` blocks of one size inside one compiled
loop (no dispatch), each over a window that moves with the loop index (so nothing is hoisted),
computed by `lcsm_jax.decoding.blocks.apply_block` with the `BlockConfig` given; and the
crossover rule read off a table of such times."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.tuning.timing import median_seconds


def powers_of_two(low: int, high: int) -> list[int]:
  """The powers of two in [low, high]."""
  return [1 << k for k in range(max(low, 1).bit_length() - 1, high.bit_length())
          if low <= 1 << k <= high]


@functools.lru_cache(maxsize=64)
def _block_loop(config: blocks_lib.BlockConfig, size: int, out_len: int, count: int):
  @jax.jit
  def run(buffer, taps, spectra):  # buffer (size + count, S, B, D)
    def body(j, acc):  # the window moves with j, as in flash, so nothing is hoisted
      window = lax.dynamic_slice_in_dim(buffer, j, size, axis=0)
      return acc + blocks_lib.apply_block(config, window, taps, spectra, out_len)
    zeros = jnp.zeros((out_len,) + buffer.shape[1:], jnp.float32)
    return lax.fori_loop(0, count, body, zeros)
  return run


def time_in_loop(config: blocks_lib.BlockConfig, size: int, streams: int, batch: int,
                 width: int, count: int, repeats: int, out_len: int | None = None,
                 precomputed_spectra: bool = True) -> dict[str, Any]:
  """Seconds per block of `size` (the implementation `config` gives it), `count` blocks of
  `out_len` rows (default `size`) over (S, B, D) = (streams, batch, width) in one compiled
  loop, random inputs and taps; FFT blocks read a precomputed filter spectrum unless not
  `precomputed_spectra`. Returns {"seconds" (per block), "inner" (count), "compile_seconds"}."""
  out_len = size if out_len is None else out_len
  run = _block_loop(config, size, out_len, count)
  rng = np.random.default_rng(size)  # NumPy: no random program to compile per shape
  buffer = jnp.asarray(rng.standard_normal((size + count, streams, batch, width), np.float32))
  taps = jnp.asarray(rng.standard_normal((2 * size, streams, width), np.float32))
  fft = config.method(size) == "fft" and precomputed_spectra
  spectra = blocks_lib.spectra_for(taps, [size] if fft else [])
  start = time.perf_counter()
  executable = run.lower(buffer, taps, spectra).compile()
  compile_seconds = time.perf_counter() - start
  seconds, _ = median_seconds(lambda: executable(buffer, taps, spectra), repeats)
  return {"seconds": seconds / count, "inner": count, "compile_seconds": compile_seconds}


def crossover(per_size: dict[int, dict[str, float | None]], method: str = "direct") -> int:
  """Largest U such that `method` was measured and no slower than "fft" at every measured
  U' <= U (0 if it loses, or was not measured, at the smallest): the rule of
  `lcsm_jax.tuning.crossover.measure_crossover`. Sizes where fft was not measured are passed
  over."""
  best = 0
  for size in sorted(per_size):
    t, fft = per_size[size].get(method), per_size[size].get("fft")
    if fft is None:
      continue
    if t is None or t > fft:
      break
    best = size
  return best
