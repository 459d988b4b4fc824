"""tau='auto' for a session: the crossover its flash engine is made with.

For base 2 it is the binary blocks' direct/FFT crossover (`crossover.crossover`). For larger
bases, where a level's direct event covers b - 1 blocks and the smallest FFT level sets the
rings' tile, isolated blocks do not rank the choices the way the engine does: at 8 x 256
channels on a 2-core Xeon the binary crossover came out 32, 64 and 2 in turn (tau 4, 16 or 1
for base 4), while the engine ran 4K positions in 0.37 s with tau 4 against 0.44 s with 16 and
0.46 s with 1; on one core of the same machine, and for one stream of 2048 channels, it ran
fastest with 16. So sessions of at least MIN_SESSION_LENGTH positions on CPU time the engine
itself (the layer below the sessions that call this): a mixing-only stack of the session's
streams, batch rows and width (`models.conv_stack.ConvStack`), each output fed back as the
next input, over TUNING_LENGTH positions with each candidate tau (every b^k whose direct
rectangle (b - 1) b^k is at most `crossover.MAX_DIRECT_SIZE`: 1, 4, 16, 64 for base 4), once
per machine, core count and shape (about 15 s at 8 x 256), cached in
`$LCSM_JAX_CACHE_DIR/engine_tau.json`. The result is returned as the widest direct rectangle,
(b - 1) tau, which `crossover.direct_limit` maps back to tau.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding import strategies
from lcsm_jax.decoding.engine import Engine
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.tuning import cache as cache_lib
from lcsm_jax.tuning import crossover as crossover_lib
from lcsm_jax.tuning import machine

MIN_SESSION_LENGTH = 4096  # shorter sessions use the binary crossover: too short to repay ~15 s
TUNING_LENGTH = 4096       # positions of a timed run (at 4K the ranking was that of 16K)
MAX_TUNING_WORK = 1 << 23  # channels x positions of a timed run (8 x 256 channels at 4K): wider
                           # shapes run fewer positions
MIN_TUNING_LENGTH = 1024   # ... but not fewer than this (wider still: the binary crossover)
ROUNDS = 3                 # timed runs of every candidate, interleaved, after a warm-up run
ENGINE_REVISION = 2        # part of the cache key: raised when the engine's costs change, so
                           # that measurements of an older engine are not used (2: time-major
                           # staging, static direct events, 2026-12-04)


def cache_path():
  return cache_lib.directory() / "engine_tau.json"


def cache_key(streams: int, batch: int, width: int, base: int, smooth: Any, length: int) -> str:
  return (f"{machine.device_key()}|streams={streams}|batch={batch}|width={width}|base={base}"
          f"|smooth={smooth}|length={length}|dft_matmul<={blocks_lib.MATMUL_DFT_MAX}"
          f"|engine={ENGINE_REVISION}")


def tuning_length(channels: int) -> int | None:
  """Positions of a timed run over `channels` channels (a power of two), None if too wide."""
  length = TUNING_LENGTH
  while length * channels > MAX_TUNING_WORK and length > MIN_TUNING_LENGTH:
    length //= 2
  return length if length * channels <= MAX_TUNING_WORK else None


def candidates(base: int) -> list[int]:
  """The direct limits timed for `base`: the sizes b^k whose direct rectangle (b - 1) b^k is
  at most `crossover.MAX_DIRECT_SIZE` (the direct taps of an unresolved session cover those)."""
  sizes, size = [], 1
  while (base - 1) * size <= crossover_lib.MAX_DIRECT_SIZE:
    sizes.append(size)
    size *= base
  return sizes


def _rollout(params, tables, prompt, *, engine, num_steps: int) -> jax.Array:
  """The prompt (B, 1, D) prefilled, then `num_steps` positions, each output fed back as the
  next input (as `decoding.Rollout` does); returns the last output (B, D)."""
  outputs, state = engine.prefill(params, tables, prompt)
  _, last = engine.run(params, tables, state, num_steps, outputs[:, -1].astype(jnp.float32),
                       lambda last, r: last, lambda last, r, out: out.astype(jnp.float32))
  return last


_ROLLOUT = jax.jit(_rollout, static_argnames=("engine", "num_steps"))


def measure(streams: int, batch: int, width: int, base: int, smooth: Any, taus: list[int],
            length: int, rounds: int = ROUNDS) -> dict:
  """Times flash rolling out a ConvStack(streams, width) of `batch` rows over `length`
  positions for each tau in `taus` (a warm-up run each, then `rounds` interleaved rounds) and
  returns the medians, the fastest tau and its crossover (b - 1) tau."""
  stack = ConvStack(streams, width, length)
  params = stack.init(jax.random.key(0))
  prompt = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 1, width), np.float32))
  runs = {}
  for tau in taus:
    strategy = strategies.create("flash", EngineOptions(tau=tau, base=base, smooth=smooth))
    engine = Engine(stack, strategy, length)
    tables = jax.jit(engine.prepare)(params)
    run = functools.partial(_ROLLOUT, params, tables, prompt, engine=engine,
                            num_steps=length - 1)
    jax.block_until_ready(run())  # compiles
    runs[tau] = run
  seconds = {tau: [] for tau in taus}
  for _ in range(rounds):
    for tau, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      seconds[tau].append(time.perf_counter() - start)
  medians = {tau: statistics.median(times) for tau, times in seconds.items()}
  best = min(medians, key=medians.get)
  return {"tau": best, "crossover": (base - 1) * best,
          "median_seconds": {str(tau): t for tau, t in medians.items()},
          "streams": streams, "batch": batch, "width": width, "base": base,
          "smooth": smooth, "length": length}


def crossover(streams: int, batch: int, width: int, options: EngineOptions, max_length: int,
              sharded: bool = False) -> int:
  """The crossover that resolves tau='auto' for a session of `max_length` positions over
  `streams` x `batch` x `width` channels with `options` (`EngineOptions`): LCSM_JAX_CROSSOVER
  if set; the binary crossover for base 2, short sessions, sessions on a mesh, accelerators
  and shapes too wide to time; else the engine's own timing (cached, or measured now)."""
  forced = crossover_lib.forced_crossover()
  if forced is not None:
    return forced
  channels = streams * batch * width
  length = tuning_length(channels)
  if (options.base == 2 or max_length < MIN_SESSION_LENGTH or sharded or length is None
      or jax.default_backend() != "cpu"):
    return crossover_lib.crossover(channels)
  taus = candidates(options.base)
  key = cache_key(streams, batch, width, options.base, options.smooth, length)
  entry = cache_lib.measured(
      cache_path(), key,
      lambda: measure(streams, batch, width, options.base, options.smooth, taus, length),
      f"flash's tau for {streams} x {batch} x {width} channels, base {options.base} "
      f"(the engine timed over {length} positions with tau in {taus})")
  return int(entry["crossover"])
