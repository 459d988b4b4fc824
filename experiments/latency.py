r"""Per-token latency of flash generation: its distribution and where the spikes fall.

  python -m experiments.latency                      # small default: stack, L = 1024
  python -m experiments.latency --length=65536 --passes=3
  python -m experiments.latency --length=16384 --base=4 --smooth=false,true --passes=3

--base and --smooth (`EngineOptions.base`, `EngineOptions.smooth`; several --smooth values are
measured side by side in one run, each against the first) choose the schedule. The in-loop
split by block size models the binary schedule (base 2, not smoothed) only; other schedules
report the compiled run's total.

Flash's work is uneven: in the binary schedule, after the step at position i it adds one block
of size U = lowbit(i) (the largest power of two dividing i), so most tokens are cheap and every
2^k-th one pays a block of 2^k (base b: the largest power of b dividing i). The smoothed
schedule spreads the large blocks over the steps before they are due. Two measurements, no
host callbacks in either:

- measured: the public API called for one position at a time from Python
  (`lcsm_jax.decoding.Rollout.run(state, 1)` for the stack, `lcsm_jax.Decoder.score(state,
  ids[:, t:t+1])` for the language model), the state donated from call to call
  (`donate_state=True`, so not copied), each call timed to completion (`block_until_ready` on
  its output). This is the latency a caller that wants every token as it is made would see,
  dispatch and the API's own host work included. --passes passes after one warm-up pass; per
  position the median.
- in_loop: the compiled generation's total time (one call over every position, no dispatch),
  the variants' programs timed side by side in --repeats rounds (each round runs every
  variant once, in a rotated order; the ratio to the first variant is the median of the
  per-round ratios). With base 2 unsmoothed it is split by block size: each size's blocks are
  timed apart (all blocks of that size in one compiled loop, `lib.blocks.time_in_loop`:
  `lcsm_jax.decoding.blocks.apply_block` with the run's own `BlockConfig` and precomputed
  spectra where the run has them; blocks that flash runs in groups are timed whole), the rest
  is the per-position step cost s, so a position's in-loop latency is s + c(lowbit(i)).

Under `taskset -c N` (fewer CPUs than the machine's: XLA:CPU sizes its thread pool by them)
or with XLA_FLAGS set, a run is stored as a point of its own (`cpus_used`, `xla_flags` in its
key).

Writes --out (JSON: summary statistics, per-class table, the largest spikes), a CSV of every
position (position, U, measured seconds, in-loop model seconds) and a PNG (latency vs position;
latency per block size).
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments.lib import blocks as block_timing
from experiments.lib import flags as flags_lib
from experiments.lib import machine as machine_lib
from experiments.lib import plots
from experiments.lib import store as store_lib
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions
from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding import schedule
from lcsm_jax.tuning import scheduler


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags.DEFINE_integer("length", 1024, "Sequence length L (prompt of 1, L - 1 positions).",
                       **fv)
  flags.DEFINE_integer("passes", 2, "Timed passes of the single-position loop (after one "
                       "warm-up pass); per position the median.", **fv)
  flags.DEFINE_integer("spikes", 10, "Largest latencies listed.", **fv)
  flags.DEFINE_enum("base", "2", [str(b) for b in schedule.BASES], "Flash's tiling base.", **fv)
  flags.DEFINE_list("smooth", ["false"], "EngineOptions.smooth values measured side by side: "
                    "false, true or a block size.", **fv)
  flags.register_validator("smooth", lambda v: bool(v) and all(_valid_smooth(x) for x in v),
                           "smooth values must be false, true or integers >= 1.", **fv)
  flags.DEFINE_enum("concurrency_scheduler", "auto", ["auto", "on", "off"],
                    "XLA:CPU's concurrency-optimized scheduler for this process "
                    "(`lcsm_jax.tuning.scheduler`): auto turns it off when a smoothed variant is "
                    "measured (lcsm-generate turns it off for every run); XLA_FLAGS, when it "
                    "sets the scheduler, wins.", **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "latency.json")


def _valid_smooth(text: str) -> bool:
  try:
    parse_smooth(text)
    return True
  except ValueError:
    return False


def parse_smooth(text: str) -> bool | int:
  """An `EngineOptions.smooth` value given as text: false, true or a block size >= 1."""
  if text.lower() in ("false", "true"):
    return text.lower() == "true"
  value = int(text)
  if value < 1:
    raise ValueError(f"smooth must be false, true or a block size >= 1, got {text!r}.")
  return value


def lowbits(num_steps: int, base: int = 2) -> np.ndarray:
  """U = the largest power of `base` dividing i, for the position after online step
  r = i - 1 (0 for the last position, which adds no block); base 2: lowbit(i)."""
  i = np.arange(1, num_steps + 1, dtype=np.int64)
  size = np.ones_like(i)
  while True:
    more = (i % (size * base) == 0) & (size * base < num_steps)
    if not more.any():
      break
    size = np.where(more, size * base, size)
  return np.where(i < num_steps, size, 0)


def variant_name(smooth: bool | int) -> str:
  if isinstance(smooth, bool):
    return "smoothed" if smooth else "plain"
  return f"smoothed_above_{smooth}"


def run_latency(work: Workload, length: int, tau, passes: int, repeats: int,
                spikes: int, out, base: int = 2, smooth=(False,)) -> dict:
  """Measures both ways; returns the summary (also stored in `out` under its config key).
  With base 2 and smooth=(False,), the key of the runs made before --base and --smooth."""
  store = store_lib.Store(out)
  extra = {} if (base, tuple(smooth)) == (2, (False,)) else dict(
      base=base, smooth=[variant_name(v) for v in smooth])
  cpus = machine_lib.cpus_used()
  if cpus is not None and cpus < (os.cpu_count() or cpus):  # pinned (`taskset`): its own point
    extra["cpus_used"] = cpus
  if os.environ.get("XLA_FLAGS"):  # e.g. another scheduler for XLA:CPU: its own point too
    extra["xla_flags"] = os.environ["XLA_FLAGS"]
  key = store_lib.key_of(**work.describe(), length=length, tau=tau, passes=passes,
                         repeats=repeats, **extra)
  summary = store.run(key, lambda: _measure(work, length, tau, passes, repeats, spikes,
                                            store.path, base, tuple(smooth)))
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


def _stats(x) -> dict:
  return {"median": float(np.median(x)), "mean": float(np.mean(x)),
          "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
          "p999": float(np.percentile(x, 99.9)), "max": float(np.max(x)),
          "argmax_position": int(np.argmax(x)) + 1}


def in_loop_totals(work: Workload, params, length: int, options: dict[str, EngineOptions],
                   repeats: int) -> dict[str, dict]:
  """Each variant's compiled run over positions [1, L), timed side by side: every program
  compiled and run once first, then `repeats` rounds, each running every variant once in an
  order rotated from round to round (this machine's speed drifts by tens of percent within
  minutes). Per variant: the median round (total_seconds), every round, and the ratio to the
  first variant: the median of the per-round ratios (vs_first) and each of them."""
  programs = {name: work.program(params, "flash", length, 1, opts)
              for name, opts in options.items()}
  for program in programs.values():
    jax.block_until_ready(program.run())
  names = list(programs)
  rounds = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      jax.block_until_ready(programs[name].run())
      rounds[name].append(time.perf_counter() - start)
  out = {}
  for name in names:
    ratios = [a / b for a, b in zip(rounds[name], rounds[names[0]])]
    out[name] = {"total_seconds": float(np.median(rounds[name])),
                 "rounds_seconds": rounds[name], "vs_first": float(np.median(ratios)),
                 "vs_first_per_round": ratios,
                 "compile_seconds": programs[name].compile_seconds,
                 "resolved_tau": programs[name].resolved_tau}
    logging.info("%s: in-loop total %.3f s (median of %d rounds), %.3fx the first (rounds "
                 "%.3f .. %.3f)", name, out[name]["total_seconds"], repeats,
                 out[name]["vs_first"], min(ratios), max(ratios))
  return out


def _measure(work, length, tau, passes, repeats, spikes, path, base=2,
             smooth=(False,)) -> dict:
  num_steps = length - 1
  params = work.params()
  sizes = lowbits(num_steps, base)
  variants, measured_by_variant, model = {}, {}, None
  resolved_tau = work.session(params, "flash", length, EngineOptions(tau=tau, base=base)
                              ).engine(work.batch).strategy.tau  # the plain schedule's
  totals = in_loop_totals(work, params, length,
                          {variant_name(v): EngineOptions(tau=tau, base=base, smooth=v)
                           for v in smooth}, repeats)
  for value in smooth:
    name = variant_name(value)
    options = EngineOptions(tau=tau, base=base, smooth=value)
    # measured: single positions through the public API
    measured = single_positions(work, params, length, options, passes)
    measured_by_variant[name] = measured
    total = totals[name]
    per_class = {}
    for u in sorted(set(sizes.tolist())):
      mask = sizes == u
      per_class[str(u)] = {"positions": int(mask.sum()),
                           "measured_median": float(np.median(measured[mask])),
                           "measured_max": float(np.max(measured[mask]))}
    top = np.argsort(measured)[::-1][:spikes]
    entry = {
        "measured": _stats(measured),
        "measured_max_over_median": float(np.max(measured) / np.median(measured)),
        "measured_total_seconds": float(measured.sum()),
        "in_loop": {"total_seconds": total["total_seconds"],
                    "mean_seconds": total["total_seconds"] / num_steps,
                    "rounds_seconds": total["rounds_seconds"],
                    "compile_seconds": total["compile_seconds"],
                    "resolved_tau": total["resolved_tau"]},
        "per_block_size": per_class,
        "spikes": [{"position": int(r) + 1, "block_size": int(sizes[r]),
                    "seconds": float(measured[r])} for r in top],
    }
    if base == 2 and not value:  # the binary schedule: its total split by block size
      level_seconds = block_seconds(work, params, length, options, repeats)
      blocks_total = sum(level_seconds[u] * int((sizes == u).sum()) for u in level_seconds)
      step_seconds = max(total["total_seconds"] - blocks_total, 0.0) / num_steps
      model = step_seconds + np.asarray([level_seconds.get(int(u), 0.0) for u in sizes])
      entry["in_loop"].update(step_seconds=step_seconds, blocks_seconds=blocks_total,
                              block_seconds_per_size={str(u): v
                                                      for u, v in level_seconds.items()},
                              model=_stats(model))
      for u, row in per_class.items():
        row["in_loop_block_seconds"] = level_seconds.get(int(u), 0.0)
        row["in_loop_model"] = step_seconds + level_seconds.get(int(u), 0.0)
      odd = sizes == 1
      entry["dispatch_overhead_seconds"] = (float(np.median(measured[odd])
                                                  - np.median(model[odd]))
                                            if odd.any() else None)
    entry["in_loop_total_vs_first"] = total["vs_first"]
    entry["in_loop_total_vs_first_per_round"] = total["vs_first_per_round"]
    variants[name] = entry
    logging.info("%s: median %.1f us, p99 %.1f us, max %.1f us at position %d (%.1fx the "
                 "median); in-loop total %.3f s (%.2fx the first)", name,
                 entry["measured"]["median"] * 1e6, entry["measured"]["p99"] * 1e6,
                 entry["measured"]["max"] * 1e6, entry["measured"]["argmax_position"],
                 entry["measured_max_over_median"], entry["in_loop"]["total_seconds"],
                 entry["in_loop_total_vs_first"])
  summary = {
      "config": dict(work.describe(), length=length, tau=tau, passes=passes, base=base,
                     smooth=[variant_name(v) for v in smooth],
                     cpus_used=machine_lib.cpus_used(),
                     xla_flags=os.environ.get("XLA_FLAGS", ""),
                     resolved_tau=resolved_tau, dft_matmul_max=blocks_lib.MATMUL_DFT_MAX),
      "positions": "absolute position r + 1 of online step r (prompt of 1); block_size: the "
                   "largest power of the base dividing it",
      "variants": variants,
  }
  json_path, csv_path, png_path = plots.output_paths(path)
  rows = []
  for r in range(num_steps):
    row = {"position": r + 1, "block_size": int(sizes[r])}
    for name, measured in measured_by_variant.items():
      row[f"{name}_measured_seconds"] = float(measured[r])
    if model is not None:
      row["in_loop_model_seconds"] = float(model[r])
    rows.append(row)
  store_lib.write_csv(csv_path, rows)
  plot(measured_by_variant, model, sizes, variants, png_path, summary["config"])
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return summary


def plot(measured_by_variant, model, sizes, variants, path, config) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  ax = axes[0]
  for name, measured in measured_by_variant.items():
    positions = np.arange(1, len(measured) + 1)
    ax.plot(positions, measured * 1e6, ".", ms=2, alpha=0.5,
            label=f"{name}: measured (single positions, dispatch included)")
  if model is not None:
    ax.plot(positions, model * 1e6, ".", ms=2, alpha=0.5, label="in-loop model (step + block)")
  ax.set_yscale("log")
  ax.set_xlabel("position")
  ax.set_ylabel("latency (us)")
  ax.legend(fontsize=7, markerscale=4)
  ax.set_title(store_lib.key_of(**config), fontsize=8)
  ax = axes[1]
  for name, entry in variants.items():
    per_class = entry["per_block_size"]
    u = [int(k) for k in per_class if int(k) > 0]
    rows = [per_class[str(k)] for k in u]
    ax.plot(u, [r["measured_median"] * 1e6 for r in rows], "o-", label=f"{name}: median")
    ax.plot(u, [r["measured_max"] * 1e6 for r in rows], "^:", label=f"{name}: max")
    if "in_loop_model" in rows[0]:
      ax.plot(u, [r["in_loop_model"] * 1e6 for r in rows], "s--",
              label=f"{name}: in-loop step + block")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("block size U after the position (largest power of the base dividing it)")
  ax.set_ylabel("latency (us)")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  plots.save_figure(fig, path)


def choose_scheduler(setting: str, smooth) -> None:
  """Applies --concurrency_scheduler before JAX starts (`tuning.scheduler`); the choice reaches
  the results' keys through XLA_FLAGS."""
  if setting == "off" or (setting == "auto" and any(smooth)):
    if not scheduler.turn_off_concurrency_scheduler():
      logging.warning("XLA:CPU's concurrency-optimized scheduler stays on (XLA_FLAGS sets it, "
                      "or JAX has started).")


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  smooth = [parse_smooth(v) for v in f.smooth]
  choose_scheduler(f.concurrency_scheduler, smooth)
  run_latency(flags_lib.workload_from_flags(f, f.length), f.length, flags_lib.tau(f), f.passes,
              f.repeats, f.spikes, f.out, int(f.base), smooth)


if __name__ == "__main__":
  define_flags()
  app.run(main)
