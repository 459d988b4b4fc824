r"""Direct vs FFT flash blocks per block size U on this machine, and what the choice (tau) costs.

  python -m experiments.block_crossover                  # small default: U <= 256, L = 256
  python -m experiments.block_crossover --max_size=4096 --length=16384 \
      --taus=auto,fft,0,2,4,8,16,32,64,128
  python -m experiments.block_crossover --write_cache    # also store the crossover for tau='auto'

1. For U = 1, 2, 4, ... --max_size, the time of one block over the stack's channels (inputs
   (U, S, B, D) with S = --layers, B = --batch, D = --width, taps (2U, S, D), output U rows: the
   call flash makes, `lcsm_jax.decoding.blocks.apply_block`) with the direct (O(U^2)) and the
   FFT (precomputed spectra) implementation, measured two ways: "in_loop", the block repeated
   inside one compiled loop over sliding windows (what flash pays: no dispatch;
   `lib.blocks.time_in_loop`), and "per_call", one jitted call (what
   `lcsm_jax/tuning/crossover.py` measures, dispatch included: its `time_block` itself, over
   S * B * D channels). Direct stops being timed once it is --stop_ratio times slower than FFT.
   The crossover (largest U up to which direct was never slower) is reported for both, beside
   the one `tau='auto'` uses now (`crossover.crossover`, from its cache); with --write_cache the
   in-loop crossover and table are written to that cache (`crossover.cache_path()`) under this
   machine's `crossover.cache_key(channels)`, so later runs of tau='auto' that use the binary
   crossover (base 2, or sessions under 4096 positions: `lcsm_jax.tuning.engine_tau`) read it.
2. The total flash generation time of the stack at --length for every tau in --taus ('auto',
   'fft', 'direct' or an integer crossover); taus with direct blocks above --max_direct_size are
   skipped.

Writes --out (JSON points plus "crossover" and "taus" summaries), a CSV of the block table and a
PNG (block time vs U; flash time vs tau).
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from experiments.lib import blocks as block_timing
from experiments.lib import flags as flags_lib
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions, parse_tau
from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding import schedule
from lcsm_jax.tuning import cache as cache_lib
from lcsm_jax.tuning import crossover as crossover_lib

METHODS = ("direct", "fft")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values, repeats=5, with_tau=False)
  flags.DEFINE_integer("max_size", 256, "Largest block size U timed.", **fv)
  flags.DEFINE_float("stop_ratio", 8.0, "Direct is not timed at larger U once it is this many "
                     "times slower than FFT.", **fv)
  flags.DEFINE_integer("inner", 64, "Blocks per timed loop (fewer for large U: at most "
                       "4096 / U, at least 2).", **fv)
  flags.DEFINE_integer("length", 256, "L of the flash runs over --taus (0: none).", **fv)
  flags.DEFINE_list("taus", ["auto", "fft", "0", "4", "8", "16", "32", "64"], "tau values of "
                    "the flash runs.", **fv)
  flags.DEFINE_integer("max_direct_size", 256, "Skip taus whose plan has larger direct blocks.",
                       **fv)
  flags.DEFINE_bool("write_cache", False, "Write the in-loop crossover into tau='auto''s cache.",
                    **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "block_crossover.json")


def time_block_in_loop(method: str, size: int, streams: int, batch: int, width: int,
                       inner: int, repeats: int) -> dict:
  """Seconds per block of `method` and `size`, `inner` blocks (at most 4096 / U, at least 2)
  in one compiled loop."""
  return block_timing.time_in_loop(blocks_lib.BlockConfig(((size, method),)), size, streams,
                                   batch, width, max(2, min(inner, 4096 // size)), repeats)


def max_direct_block(tau, length: int, crossover: int) -> int:
  """Largest direct block size in the flash plan of L - 1 steps under `tau` ('auto': the
  given crossover), by `lcsm_jax.decoding.blocks.method_for`."""
  resolved = crossover if tau == "auto" else tau
  return max([s for s in schedule.block_sizes(length - 1)
              if blocks_lib.method_for(s, resolved) == "direct"], default=0)


def write_cache_entry(channels: int, crossover: int, table: dict) -> None:
  """Stores `crossover` (and the table it came from) for tau='auto' under this machine's
  `crossover_lib.cache_key(channels)` in `crossover_lib.cache_path()`, atomically."""
  path, key = crossover_lib.cache_path(), crossover_lib.cache_key(channels)
  cache_lib.store(path, key, {"crossover": crossover, "channels": channels,
                              "per_block_size": {str(u): v for u, v in table.items()},
                              "source": "experiments/block_crossover.py (in-loop timing)"})
  logging.info("wrote crossover %d for %s to %s", crossover, key, path)


def run_crossover(work: Workload, max_size: int, repeats: int, stop_ratio: float,
                  inner: int, length: int, taus, max_direct_size: int, write_cache: bool,
                  out) -> dict:
  """Measures the block table and the flash runs; returns the summary written to `out`."""
  store = store_lib.Store(out)
  shape = {"streams": work.streams, "batch": work.batch, "width": work.width}
  channels = work.channels
  tables = {"in_loop": {}, "per_call": {}}
  stopped = {"in_loop": False, "per_call": False}
  for size in block_timing.powers_of_two(1, max_size):
    for timing, table in tables.items():
      table[size] = {}
      for method in METHODS:
        if method == "direct" and stopped[timing]:
          table[size][method] = None
          continue
        key = store_lib.key_of(what="block", timing=timing, method=method, size=size,
                                  repeats=repeats, **shape)
        if timing == "in_loop":
          measure = lambda m=method: time_block_in_loop(m, size, work.streams, work.batch,
                                                        work.width, inner, repeats)
        else:
          measure = lambda m=method: {"seconds": crossover_lib.time_block(m, size, channels,
                                                                          repeats)}
        table[size][method] = store.run(key, measure)["seconds"]
      direct, fft = table[size]["direct"], table[size]["fft"]
      if direct is not None and direct > stop_ratio * fft:
        stopped[timing] = True
  crossover = {timing: block_timing.crossover(table) for timing, table in tables.items()}
  summary = {"channels": channels, **shape, "crossover": crossover, "tables": {
      timing: {str(u): v for u, v in table.items()} for timing, table in tables.items()}}
  if write_cache:
    write_cache_entry(channels, crossover["in_loop"], tables["in_loop"])
  summary["autotune_crossover"] = crossover_lib.crossover(channels, max_size)
  summary["autotune_cache"] = str(crossover_lib.cache_path())
  logging.info("crossover: in-loop %d, per-call %d; tau='auto' uses %d", crossover["in_loop"],
               crossover["per_call"], summary["autotune_crossover"])

  runs = {}
  if length > 1:
    params = work.params()
    for tau in taus:
      largest = max_direct_block(tau, length, summary["autotune_crossover"])
      if largest > max_direct_size:
        runs[str(tau)] = {"skipped": f"direct blocks up to U = {largest} > max_direct_size"}
        continue
      key = store_lib.key_of(**work.describe(), what="flash", length=length, tau=tau,
                             repeats=repeats,
                             resolved=summary["autotune_crossover"] if tau == "auto" else None)
      entry = store.run(key, lambda t=tau: sampling_lib.measure_strategy(
          work, params, "flash", length, EngineOptions(tau=t), repeats))
      runs[str(tau)] = {"total_seconds": entry["total_seconds"],
                        "per_token_seconds": entry["per_token_seconds"],
                        "compile_seconds": entry["compile_seconds"]}
    timed = {t: r["total_seconds"] for t, r in runs.items() if "total_seconds" in r}
    if timed:
      best = min(timed, key=timed.get)
      summary["best_tau"] = best
      if "auto" in timed:
        summary["auto_vs_best"] = timed["auto"] / timed[best]
      logging.info("flash at L=%d: best tau %s (%.3f s)%s", length, best, timed[best],
                   f", auto {timed['auto']:.3f} s" if "auto" in timed else "")
  summary["taus"] = runs
  summary["length"] = length
  store.set("summary", summary)
  json_path, csv_path, png_path = plots.output_paths(store.path)
  rows = [{"timing": timing, "size": u, "direct_seconds": v["direct"], "fft_seconds": v["fft"]}
          for timing, table in tables.items() for u, v in table.items()]
  store_lib.write_csv(csv_path, rows)
  plot(tables, crossover, runs, png_path, summary)
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return summary


def plot(tables, crossover, runs, path, summary) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  ax = axes[0]
  for timing, style in (("in_loop", "-"), ("per_call", "--")):
    table = tables[timing]
    for method, colour in (("direct", "C3"), ("fft", "C0")):
      points = [(u, v[method]) for u, v in sorted(table.items()) if v[method] is not None]
      if points:
        ax.plot(*zip(*points), style, marker="o", ms=3, color=colour,
                label=f"{method} ({timing.replace('_', '-')})")
    if crossover[timing]:
      ax.axvline(crossover[timing], ls=style, color="grey", alpha=0.6)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("block size U")
  ax.set_ylabel("seconds per block")
  ax.set_title(f"one block over S={summary['streams']} x B={summary['batch']} x "
               f"D={summary['width']}; crossover in-loop {crossover['in_loop']}, per-call "
               f"{crossover['per_call']}", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax = axes[1]
  timed = [(t, r["total_seconds"]) for t, r in runs.items() if "total_seconds" in r]
  if timed:
    names, values = zip(*timed)
    colours = ["C1" if n == "auto" else "C0" for n in names]
    ax.bar(range(len(names)), values, color=colours)
    ax.set_xticks(range(len(names)), [f"auto={summary['autotune_crossover']}" if n == "auto"
                                      else n for n in names])
  ax.set_xlabel("tau (largest direct block; fft: none)")
  ax.set_ylabel("flash generation time (s)")
  ax.set_title(f"flash, L = {summary['length']}", fontsize=9)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  work = flags_lib.workload_from_flags(f, max(f.length, 2))
  run_crossover(work, f.max_size, f.repeats, f.stop_ratio, f.inner, f.length,
                [parse_tau(t) for t in f.taus], f.max_direct_size, f.write_cache,
                f.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
