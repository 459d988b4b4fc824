r"""Per-token latency of flash generation: its distribution and where the spikes fall.

Measures the paper's binary schedule (`EngineOptions(base=2)`), whose block sizes it models.

  python -m experiments.latency                      # small default: stack, L = 1024
  python -m experiments.latency --length=65536 --passes=3

Flash's work is uneven: after the step at position i it adds one block of size U = lowbit(i)
(the largest power of two dividing i), so most tokens are cheap and every 2^k-th one pays a
block of 2^k. Two measurements, no host callbacks in either:

- measured: the public API called for one position at a time from Python
  (`lcsm_jax.decoding.Rollout.run(state, 1)` for the stack, `lcsm_jax.Decoder.score(state,
  ids[:, t:t+1])` for the language model), the state donated from call to call
  (`donate_state=True`, so not copied), each call timed to completion (`block_until_ready` on
  its output). This is the latency a caller that wants every token as it is made would see,
  dispatch and the API's own host work included. --passes passes after one warm-up pass; per
  position the median.
- in_loop: the compiled generation's total time (one call over every position, no dispatch),
  split by block size: each size's blocks are timed apart (all blocks of that size in one
  compiled loop, `lib.blocks.time_in_loop`: `lcsm_jax.decoding.blocks.apply_block` with the
  run's own `BlockConfig` and precomputed spectra where the run has them; blocks that flash runs
  in groups are timed whole), the rest is the per-position step cost s, so a position's in-loop
  latency is s + c(lowbit(i)).

Writes --out (JSON: summary statistics, per-class table, the largest spikes), a CSV of every
position (position, U, measured seconds, in-loop model seconds) and a PNG (latency vs position;
latency per block size).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments.lib import blocks as block_timing
from experiments.lib import flags as flags_lib
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions
from lcsm_jax.decoding import schedule


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags.DEFINE_integer("length", 1024, "Sequence length L (prompt of 1, L - 1 positions).",
                       **fv)
  flags.DEFINE_integer("passes", 2, "Timed passes of the single-position loop (after one "
                       "warm-up pass); per position the median.", **fv)
  flags.DEFINE_integer("spikes", 10, "Largest latencies listed.", **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "latency.json")


def lowbits(num_steps: int) -> np.ndarray:
  """U = lowbit(i) of the block after online position r = i - 1 (0 for the last position,
  which adds no block)."""
  i = np.arange(1, num_steps + 1, dtype=np.int64)
  return np.where(i < num_steps, i & -i, 0)


def run_latency(work: Workload, length: int, tau, passes: int, repeats: int,
                spikes: int, out) -> dict:
  """Measures both ways; returns the summary (also stored in `out` under its config key)."""
  store = store_lib.Store(out)
  key = store_lib.key_of(**work.describe(), length=length, tau=tau, passes=passes,
                         repeats=repeats)
  summary = store.run(key, lambda: _measure(work, length, tau, passes, repeats, spikes,
                                            store.path))
  return summary


def single_positions(work: Workload, params, length: int, options: EngineOptions,
                     passes: int) -> np.ndarray:
  """Seconds of every online position r = 0 .. L-2, each one call of the public API, median
  over `passes` passes after a warm-up pass."""
  num_steps = length - 1
  session = work.session(params, "flash", length, options, donate_state=True)
  start, _, step = work.calls(session, length, 1)
  latencies = np.zeros((max(passes, 1), num_steps))
  for p in range(max(passes, 1) + 1):  # pass 0 is the warm-up (and compiles)
    state = jax.block_until_ready(start())
    began = time.perf_counter()
    for r in range(num_steps):
      t0 = time.perf_counter()
      out, state = step(state, r + 1)
      out.block_until_ready()
      if p:
        latencies[p - 1, r] = time.perf_counter() - t0
    logging.info("pass %d%s: %.3f s", p, " (warm-up)" if not p else "",
                 time.perf_counter() - began)
  return np.median(latencies, axis=0)


def block_seconds(work: Workload, params, length: int, options: EngineOptions,
                  repeats: int) -> dict[int, float]:
  """Seconds per block of every block size of flash's plan over L - 1 online positions, in
  one compiled loop of all the plan's blocks of that size, with the run's `BlockConfig`."""
  num_steps = length - 1
  plan = schedule.FlashPlan(num_steps)
  strategy = work.session(params, "flash", length, options).engine(work.batch).strategy
  config = strategy.block_config(num_steps)
  spectra = set(strategy.spectrum_sizes(length))
  sizes = lowbits(num_steps)
  seconds = {}
  for level in range(plan.num_levels):
    size = 1 << level
    count = int((sizes == size).sum())
    if count:
      seconds[size] = block_timing.time_in_loop(
          config, size, work.streams, work.batch, work.width, count, repeats,
          out_len=plan.rows_written(level), precomputed_spectra=size in spectra)["seconds"]
  return seconds


def _measure(work, length, tau, passes, repeats, spikes, path) -> dict:
  options = EngineOptions(tau=tau, base=2)  # the binary schedule, whose blocks it models
  num_steps = length - 1
  params = work.params()

  # measured: single positions through the public API
  measured = single_positions(work, params, length, options, passes)

  # in_loop: the compiled run's total, split by block size
  total = sampling_lib.measure_strategy(work, params, "flash", length, options, repeats)
  sizes = lowbits(num_steps)
  level_seconds = block_seconds(work, params, length, options, repeats)
  blocks_total = sum(level_seconds[u] * int((sizes == u).sum()) for u in level_seconds)
  step_seconds = max(total["total_seconds"] - blocks_total, 0.0) / num_steps
  model = step_seconds + np.asarray([level_seconds.get(int(u), 0.0) for u in sizes])

  def stats(x):
    return {"median": float(np.median(x)), "mean": float(np.mean(x)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
            "p999": float(np.percentile(x, 99.9)), "max": float(np.max(x)),
            "argmax_position": int(np.argmax(x)) + 1}

  per_class = {}
  for u in sorted(set(sizes.tolist())):
    mask = sizes == u
    per_class[str(u)] = {"positions": int(mask.sum()), "measured_median": float(
        np.median(measured[mask])), "measured_max": float(np.max(measured[mask])),
                         "in_loop_block_seconds": level_seconds.get(u, 0.0),
                         "in_loop_model": step_seconds + level_seconds.get(u, 0.0)}
  top = np.argsort(measured)[::-1][:spikes]
  odd = sizes == 1
  summary = {
      "config": dict(work.describe(), length=length, tau=tau, passes=passes),
      "positions": "absolute position r + 1 of online step r (prompt of 1)",
      "measured": stats(measured),
      "measured_total_seconds": float(measured.sum()),
      "in_loop": {"total_seconds": total["total_seconds"],
                  "mean_seconds": total["total_seconds"] / num_steps,
                  "step_seconds": step_seconds, "blocks_seconds": blocks_total,
                  "block_seconds_per_size": {str(u): v for u, v in level_seconds.items()},
                  "model": stats(model)},
      "dispatch_overhead_seconds": float(np.median(measured[odd]) - np.median(model[odd]))
                                   if odd.any() else None,
      "per_block_size": per_class,
      "spikes": [{"position": int(r) + 1, "block_size": int(sizes[r]),
                  "seconds": float(measured[r])} for r in top],
  }
  logging.info("latency: median %.1f us, p99 %.1f us, max %.1f us at position %d; in-loop "
               "mean %.1f us (step %.1f us)", summary["measured"]["median"] * 1e6,
               summary["measured"]["p99"] * 1e6, summary["measured"]["max"] * 1e6,
               summary["measured"]["argmax_position"], summary["in_loop"]["mean_seconds"] * 1e6,
               step_seconds * 1e6)
  json_path, csv_path, png_path = plots.output_paths(path)
  store_lib.write_csv(csv_path, [
      {"position": r + 1, "block_size": int(sizes[r]), "measured_seconds": float(measured[r]),
       "in_loop_model_seconds": float(model[r])} for r in range(num_steps)])
  plot(measured, model, sizes, per_class, png_path, summary["config"])
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return summary


def plot(measured, model, sizes, per_class, path, config) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  positions = np.arange(1, len(measured) + 1)
  ax = axes[0]
  ax.plot(positions, measured * 1e6, ".", ms=2, alpha=0.5, label="measured (single positions, "
          "dispatch included)")
  ax.plot(positions, model * 1e6, ".", ms=2, alpha=0.5, label="in-loop model (step + block)")
  ax.set_yscale("log")
  ax.set_xlabel("position")
  ax.set_ylabel("latency (us)")
  ax.legend(fontsize=7, markerscale=4)
  ax.set_title(store_lib.key_of(**config), fontsize=8)
  ax = axes[1]
  u = [int(k) for k in per_class if int(k) > 0]
  rows = [per_class[str(k)] for k in u]
  ax.plot(u, [r["measured_median"] * 1e6 for r in rows], "o-", label="measured median")
  ax.plot(u, [r["measured_max"] * 1e6 for r in rows], "^:", label="measured max")
  ax.plot(u, [r["in_loop_model"] * 1e6 for r in rows], "s--", label="in-loop step + block")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("block size U after the position (lowbit of the position)")
  ax.set_ylabel("latency (us)")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  run_latency(flags_lib.workload_from_flags(f, f.length), f.length, flags_lib.tau(f), f.passes,
              f.repeats, f.spikes, f.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
