"""One strategy's generation time over positions [1, L): a full run, or, for the strategies too
slow to run in full at large L, a sampled or extrapolated measurement (`Sampling`).

Timing (every figure): the program's compilation apart (`workloads.Program`), then `warmup`
untimed runs and the median of `repeats` runs (`lcsm_jax.tuning.timing.median_seconds`, each
run ended by `jax.block_until_ready`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import numpy as np
import scipy.optimize

from experiments.lib import machine
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions
from lcsm_jax.decoding.strategies import recompute
from lcsm_jax.tuning.timing import median_seconds


@dataclasses.dataclass(frozen=True)
class Sampling:
  """When and how a slow strategy is measured on a sample instead of a full run.

  lazy_above: lazy is sampled for L above this: per-token cost at `positions` prompt lengths t
    spread over [1, L), as (T(t, k) - T(t, 0)) / k with T(t, k) the time of the prefill of t
    positions and k online steps after it (the steps run at positions t .. t+k-1), then
    interpolated linearly over every position and summed.
  recompute_above: recompute is sampled for L above this: its per-token cost is that of one
    forward over the position's power-of-two bucket (`recompute.buckets`), so one sample (of
    `recompute_steps` steps) per bucket, times the positions in the bucket; the positions below
    4 * recompute_steps run in full.
  eager_max: eager (whose per-token cost depends on the steps still to come, so it cannot be
    measured from a prompt) runs in full up to this L; above, its full-run time at eager_max/4,
    eager_max/2 and eager_max is fitted by c + a n + b n^2 (n = steps, coefficients >= 0)
    and extrapolated.
  """

  lazy_above: int = 8192
  recompute_above: int = 1024
  eager_max: int = 8192
  positions: int = 4
  steps: int = 64
  recompute_steps: int = 4

  def method(self, strategy: str, length: int) -> str:
    """'full', 'sampled' or 'extrapolated'."""
    if strategy == "lazy" and length > self.lazy_above:
      return "sampled"
    if strategy == "recompute" and length > self.recompute_above:
      return "sampled"
    if strategy == "eager" and length > self.eager_max:
      return "extrapolated"
    return "full"

  def key(self, strategy: str, length: int) -> dict[str, Any]:
    """What a measured point depends on (nothing for a full run), for its store key."""
    method = self.method(strategy, length)
    key = {"method": method}
    if method != "full":
      key["sampling"] = {"lazy": [self.positions, self.steps],
                         "recompute": [self.recompute_steps],
                         "eager": [self.eager_max]}[strategy]
    return key


_MEMO: dict[Any, dict[str, Any]] = {}


def _memoized(key, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """`measure()`, measured once per process for `key` (sweeps over L share samples: the
  recompute bucket samples, eager's fit runs). Unhashable keys are not memoized."""
  try:
    hash(key)
  except TypeError:
    return measure()
  if key not in _MEMO:
    _MEMO[key] = measure()
  return _MEMO[key]


def steps_seconds(work: Workload, params, strategy: str, prompt: int, steps: int,
                  options: EngineOptions, repeats: int) -> dict[str, Any]:
  """Seconds of `steps` online positions after a prompt of `prompt`: T(prompt, steps) -
  T(prompt, 0), the prefill followed by the steps less the prefill alone (so the prefill
  cancels out). Memoized per process (the parameters' values, and l_max, change no timing)."""
  key = ("steps", work.replace(max_length=0), strategy, prompt, steps, options, repeats)
  return _memoized(key, lambda: _steps_seconds(work, params, strategy, prompt, steps, options,
                                               repeats))


def _steps_seconds(work, params, strategy, prompt, steps, options, repeats) -> dict[str, Any]:
  program = work.program(params, strategy, prompt + steps, prompt, options)
  t_steps = median_seconds(program.run, repeats)[0]
  t_none = median_seconds(program.prefill, repeats)[0]
  seconds, bound = t_steps - t_none, False
  if seconds <= 0:  # lost in the noise (tiny sizes): fall back to an upper bound
    seconds, bound = t_steps, True
  return {"seconds": seconds, "upper_bound": bound,
          "compile_seconds": program.compile_seconds, "memory": program.memory}


def offline_forward(work: Workload, params, length: int, repeats: int) -> dict[str, Any]:
  """One offline parallel forward over `length` positions (the reference of every ratio):
  seconds, compile_seconds (apart), xla_memory (XLA's analysis of its program)."""
  program = work.forward(params, length)
  seconds, _ = median_seconds(program.run, repeats)
  return {"seconds": seconds, "compile_seconds": program.compile_seconds,
          "xla_memory": program.memory}


def full_run(work: Workload, params, strategy: str, length: int, options: EngineOptions,
             repeats: int, warmup: int = 1) -> dict[str, Any]:
  """Every position [1, L) after a one-position prompt, timed as one call."""
  program = work.program(params, strategy, length, 1, options)
  seconds, runs = median_seconds(program.run, repeats, warmup)
  entry = {"total_seconds": seconds, "runs_seconds": runs, "method": "full",
           "compile_seconds": program.compile_seconds,
           "tables_compile_seconds": program.tables_compile_seconds,
           "prepare_seconds": program.prepare_seconds, "xla_memory": program.memory}
  if program.resolved_tau is not None:
    entry["resolved_tau"] = program.resolved_tau
  return entry


def lazy_samples(work: Workload, params, starts, k: int, options: EngineOptions,
                 repeats: int) -> tuple[list[float], list[dict[str, Any]]]:
  """Lazy's per-token seconds (T(t, k) - T(t, 0)) / k after prompts of the lengths t in
  `starts`, and the `steps_seconds` samples they came from."""
  samples = [steps_seconds(work, params, "lazy", int(t), k, options, repeats) for t in starts]
  per_token = [sample["seconds"] / k for sample in samples]
  for t, cost in zip(starts, per_token):
    logging.info("lazy at t=%d: %.1f us/token", t, cost * 1e6)
  return per_token, samples


def _lazy_sampled(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  k = min(sampling.steps, length - 1)
  starts = np.unique(np.linspace(1, length - k, max(sampling.positions, 2)).astype(int))
  per_token, samples = lazy_samples(work, params, starts, k, options, repeats)
  compile_seconds = sum(sample["compile_seconds"] for sample in samples)
  memory = samples[-1]["memory"]
  bound = any(sample["upper_bound"] for sample in samples)
  centres = starts + (k - 1) / 2  # each sample is the mean over positions t .. t+k-1
  all_t = np.arange(1, length, dtype=float)
  total = float(np.interp(all_t, centres, per_token).sum())
  return {"total_seconds": total, "method": "sampled", "compile_seconds": compile_seconds,
          "xla_memory": memory, "upper_bound": bound,
          "sample_positions": starts.tolist(), "sample_steps": k,
          "sample_per_token_seconds": per_token,
          "sampling": "per-token cost (T(t, k) - T(t, 0)) / k at the sampled prompt lengths t, "
                      "interpolated linearly over positions 1 .. L-1 and summed"}


def _recompute_sampled(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  k = sampling.recompute_steps
  buckets = recompute.buckets(length)
  head = next(b for b in buckets if b >= min(4 * k, length))
  first = steps_seconds(work, params, "recompute", 1, head - 1, options, repeats)
  total, compile_seconds, bound = first["seconds"], first["compile_seconds"], first["upper_bound"]
  memory, samples = first["memory"], []
  for previous, bucket in zip(buckets, buckets[1:]):
    if bucket <= head:
      continue
    start = max(previous, bucket - k)  # the bucket's last positions t .. bucket-1
    sample = steps_seconds(work, params, "recompute", start, bucket - start, options, repeats)
    cost = sample["seconds"] / (bucket - start)
    total += cost * (bucket - previous)
    compile_seconds += sample["compile_seconds"]
    memory, bound = sample["memory"], bound or sample["upper_bound"]
    samples.append({"bucket": bucket, "positions": bucket - previous, "per_token_seconds": cost})
    logging.info("recompute, bucket %d (L=%d): %.2f ms/token", bucket, length, cost * 1e3)
  return {"total_seconds": total, "method": "sampled", "compile_seconds": compile_seconds,
          "xla_memory": memory, "upper_bound": bound, "head_positions": head - 1,
          "head_seconds": first["seconds"], "buckets": samples,
          "sampling": "positions 1 .. head-1 run in full; every later power-of-two bucket "
                      "(one forward over the bucket per token) sampled at its last positions, "
                      "times the positions in the bucket"}


def _eager_extrapolated(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  lengths = sorted({max(sampling.eager_max // 4, 8), max(sampling.eager_max // 2, 9),
                    sampling.eager_max})
  if len(lengths) < 3:
    raise ValueError(f"eager_max {sampling.eager_max} is too small to extrapolate from.")
  runs = [_memoized(("full", work.replace(max_length=0), "eager", m, options, repeats),
                    lambda m=m: full_run(work, params, "eager", m, options, repeats))
          for m in lengths]
  n = np.asarray(lengths, float) - 1
  coef, _ = scipy.optimize.nnls(np.stack([np.ones_like(n), n, n * n], -1),
                                np.asarray([r["total_seconds"] for r in runs]))
  steps = length - 1
  total = float(coef[0] + coef[1] * steps + coef[2] * steps * steps)
  return {"total_seconds": total, "method": "extrapolated",
          "compile_seconds": sum(r["compile_seconds"] for r in runs),
          "xla_memory": runs[-1]["xla_memory"], "fit_lengths": lengths,
          "fit_total_seconds": [r["total_seconds"] for r in runs],
          "fit_coefficients": coef.tolist(),
          "sampling": "full runs at the fit lengths, fitted by c + a n + b n^2 (n = steps; "
                      "non-negative least squares) and evaluated at n = L - 1"}


def measure_strategy(work: Workload, params, strategy: str, length: int,
                     options: EngineOptions, repeats: int = 3,
                     sampling: Sampling = Sampling(), warmup: int = 1) -> dict[str, Any]:
  """Time of generating positions [1, L) with `strategy`, measured as `sampling` says.

  Returns a JSON-able dict: total_seconds, per_token_seconds (total / (L - 1)), compile_seconds
  (all programs it compiled), xla_memory (`workloads.memory_parts` of the largest program it
  ran), method ('full', 'sampled' or 'extrapolated'), sampled (method != 'full'), the samples
  where sampled, and peak_rss_bytes_so_far of this process.
  """
  method = sampling.method(strategy, length)
  if method == "full":
    entry = full_run(work, params, strategy, length, options, repeats, warmup)
  elif strategy == "lazy":
    entry = _lazy_sampled(work, params, length, options, repeats, sampling)
  elif strategy == "recompute":
    entry = _recompute_sampled(work, params, length, options, repeats, sampling)
  else:
    entry = _eager_extrapolated(work, params, length, options, repeats, sampling)
  entry["sampled"] = method != "full"
  entry["per_token_seconds"] = entry["total_seconds"] / (length - 1)
  entry["peak_rss_bytes_so_far"] = machine.max_rss_bytes()
  logging.info("%s L=%d: %.3f s, %.1f us/token, compile %.1f s (%s)", strategy, length,
               entry["total_seconds"], entry["per_token_seconds"] * 1e6,
               entry["compile_seconds"], method)
  return entry
