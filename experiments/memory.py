r"""Peak memory of generation against L, per strategy, and the bytes of state kept per token.

  python -m experiments.memory                       # small default: L = 256 .. 1024
  python -m experiments.memory --lengths=1024,4096,16384,65536,262144,1048576 \
      --rss_max_length=65536

For every strategy and L, without running anything (`lib.workloads.Workload.estimate`: the
session's `estimate_memory` and `state_shape`, compiled from shapes only, so any L can be
estimated): the bytes of parameters, of the strategy's tables (filters, flash's spectra) and of
its state (flash: inputs and pending outputs; lazy: the input history; eager: pending outputs;
recompute: the inputs of every position), the state per token, and XLA's memory analysis of
the table, prefill and online programs (`xla_peak_bytes`: their sum with the parameters, the
figure the library checks before a run; `xla_loop_peak_bytes`: the online program's).
Up to --rss_max_length, and where the estimate fits in the memory available, the program is
also run once in a fresh Python process (so that nothing else counts) to read its peak
resident set: `rss_before_run_bytes` (after imports, parameters, tables and compilation) and
`rss_peak_bytes` (after the run). Flash, lazy and eager run in full (lazy and eager, whose runs
are quadratic, only up to --rss_max_length_quadratic); recompute runs its last 4 positions
after a prompt of L - 4 (its buffers and the forward over the full length are those of the
whole run's last step, where its peak is, and the prefill is a forward of the same size).

Writes --out (JSON points), a CSV and a PNG (peak bytes vs L per strategy; state bytes per
token vs L).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import plots
from experiments.lib import store as store_lib
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions

STRATEGIES = ("flash", "lazy", "eager", "recompute")
COLOURS = {"flash": "C0", "lazy": "C1", "eager": "C2", "recompute": "C3"}
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags.DEFINE_list("lengths", ["256", "512", "1024"], "Lengths L.", **fv)
  flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies.", **fv)
  flags.DEFINE_integer("rss_max_length", 1024, "Measure the peak RSS in a fresh process up to "
                       "this L (0: never).", **fv)
  flags.DEFINE_integer("rss_max_length_quadratic", 8192, "... and for lazy and eager (full "
                       "runs of quadratic cost) only up to this L.", **fv)
  flags.DEFINE_float("memory_fraction", 0.85, "Fraction of available memory a measured run may "
                     "use by XLA's estimate.", **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "memory.json")


def child_peak(spec: dict) -> dict:
  """In a fresh process: builds the program of `spec` and runs it once; returns peak RSS."""
  work = Workload(**spec["workload"])
  params = work.params()
  program = work.program(params, spec["strategy"], spec["length"], spec["prompt"],
                         EngineOptions(tau=spec["tau"]))
  before = machine.max_rss_bytes()
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(program.run())
  return {"rss_before_run_bytes": before, "rss_peak_bytes": machine.max_rss_bytes()}


RECOMPUTE_TAIL = 4


def measure_rss(work: Workload, strategy: str, length: int, tau) -> dict:
  """`child_peak` in a new Python process (the repository root on its path)."""
  prompt = max(length - RECOMPUTE_TAIL, 1) if strategy == "recompute" else 1
  spec = {"workload": {"kind": work.kind, "layers": work.layers, "width": work.width,
                       "batch": work.batch, "inner_width": work.inner_width,
                       "order": work.order, "max_length": work.max_length},
          "strategy": strategy, "length": length, "tau": tau, "prompt": prompt}
  code = ("import json, sys; from experiments import memory; "
          "print('RESULT ' + json.dumps(memory.child_peak(json.loads(sys.argv[1]))))")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"memory child failed ({done.returncode}): {done.stderr[-2000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  result["rss_run"] = f"positions [{prompt}, {length}) after a prompt of {prompt}"
  return result


def run_memory(work_of, lengths, strategies, tau, rss_max_length: int,
               memory_fraction: float, out, rss_max_length_quadratic: int = 8192) -> list[dict]:
  """Estimates (and where asked, measures) every (strategy, L); returns the CSV rows."""
  store = store_lib.Store(out)
  rows = []
  for length in lengths:
    work = work_of(length)
    for strategy in strategies:
      base = dict(work.describe(), length=length, strategy=strategy,
                  tau=tau if strategy == "flash" else None)
      estimate = store.run(store_lib.key_of(**base, what="estimate"), lambda s=strategy: (
          work.estimate(s, length, EngineOptions(tau=tau))))
      row = {"strategy": strategy, "length": length, "params_bytes": estimate["params_bytes"],
             "tables_bytes": estimate["tables_bytes"], "state_bytes": estimate["state_bytes"],
             "state_bytes_per_token": estimate["state_bytes_per_token"],
             "state_bytes_per_token_per_channel": estimate["state_bytes_per_token"] / (
                 work.streams * work.batch * work.width),
             "xla_loop_peak_bytes": estimate["online_program_bytes"],
             "xla_peak_bytes": estimate["peak_bytes"]}
      limit = rss_max_length
      if strategy in ("lazy", "eager"):
        limit = min(limit, rss_max_length_quadratic)
      if length <= limit:
        ok, why = machine.fits_in_memory(estimate["peak_bytes"], memory_fraction)
        if ok:
          rss = store.run(store_lib.key_of(**base, what="rss"),
                          lambda s=strategy: measure_rss(work, s, length, tau))
          row.update(rss)
        else:
          logging.warning("%s at L=%d: no RSS run: %s", strategy, length, why)
      rows.append(row)
      logging.info("%s L=%d: state %.1f MiB (%.0f B/token), XLA peak %.1f MiB%s", strategy,
                   length, row["state_bytes"] / 2**20, row["state_bytes_per_token"],
                   row["xla_peak_bytes"] / 2**20,
                   f", RSS peak {row['rss_peak_bytes'] / 2**20:.0f} MiB"
                   if "rss_peak_bytes" in row else "")
  store.set("rows", rows)
  json_path, csv_path, png_path = plots.output_paths(store.path)
  store_lib.write_csv(csv_path, rows)
  plot(rows, png_path, store_lib.key_of(**work_of(min(lengths)).describe()))
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return rows


def plot(rows, path, title: str) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for strategy in dict.fromkeys(r["strategy"] for r in rows):
    mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["length"])
    n = [r["length"] for r in mine]
    colour = COLOURS.get(strategy)
    axes[0].plot(n, [r["xla_peak_bytes"] for r in mine], "-o", ms=3, color=colour,
                 label=f"{strategy} (XLA estimate)")
    rss = [(r["length"], r["rss_peak_bytes"]) for r in mine if "rss_peak_bytes" in r]
    if rss:
      axes[0].plot(*zip(*rss), "x--", color=colour, label=f"{strategy} (process peak RSS)")
    axes[1].plot(n, [r["state_bytes_per_token"] for r in mine], "-o", ms=3, color=colour,
                 label=strategy)
  for ax, name in zip(axes, ("peak bytes", "state bytes per token")):
    plots.log_length_axes(ax, name)
    ax.legend(fontsize=7)
  fig.suptitle(f"generation memory vs L  {title}", fontsize=9)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  run_memory(lambda n: flags_lib.workload_from_flags(f, n), [int(n) for n in f.lengths],
             f.strategies, flags_lib.tau(f), f.rss_max_length, f.memory_fraction,
             f.out, f.rss_max_length_quadratic)


if __name__ == "__main__":
  define_flags()
  app.run(main)
