r"""Generation time and time per token against the sequence length L, every strategy.

  python -m experiments.scaling                      # small default: L = 256 .. 1024
  python -m experiments.scaling --lengths=1024,2048,4096,8192,16384,32768,65536 \
      --flash_lengths=131072,262144,524288,1048576
  python -m experiments.scaling --model=lm --out=experiments/results/scaling_lm.json \
      --replot --long_run=experiments/results/long_run.json   # redraw, adding the long run

Every strategy runs at --lengths (lazy, recompute sampled and eager extrapolated where slow:
`lib.sampling.Sampling`); flash alone also at --flash_lengths. A length whose XLA memory
estimate does not fit in the memory available (checked from --check_memory_above) is skipped
and reported. One offline parallel forward is timed at every length as the reference.

Writes --out (JSON: points, plus "fits": the exponent p of total time ~ L^p fitted between
--fit_range for every strategy, flash's being the headline), the same table as CSV, and a
log-log plot (PNG): time per token and total time against L; hollow markers are sampled or
extrapolated points. --long_run adds `long_run.py`'s flash run (one run, e.g. 2^20 tokens) as
a star when it ran the same model; --replot redraws the PNG from the CSV and JSON already
written (measuring nothing, whichever machine they came from).
"""

from __future__ import annotations

import csv
import json
import pathlib

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from lcsm_jax.decoding import EngineOptions

STRATEGIES = ("flash", "lazy", "eager", "recompute")
COLOURS = {"flash": "C0", "lazy": "C1", "eager": "C2", "recompute": "C3", "forward": "k"}
LONG_RUN = "flash, long run"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags_lib.define_sampling_flags(flag_values)
  flags.DEFINE_list("lengths", ["256", "512", "1024"], "Lengths L for every strategy.", **fv)
  flags.DEFINE_list("flash_lengths", [], "Further lengths for flash only.", **fv)
  flags.DEFINE_enum("base", "2", ["2", "4", "8", "16"], "Flash's tiling base "
                    "(EngineOptions.base).", **fv)
  flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies.", **fv)
  flags.DEFINE_list("fit_range", ["4096", "65536"], "Lengths between which the exponent is "
                    "fitted.", **fv)
  flags.DEFINE_integer("check_memory_above", 131072, "Lengths from this one are first "
                       "compiled only, and skipped if XLA's memory estimate does not fit.", **fv)
  flags.DEFINE_float("memory_fraction", 0.85, "Fraction of available memory a point may use.",
                     **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "scaling.json")
  flags.DEFINE_string("long_run", "", "A long_run.py JSON whose flash run is drawn too (if it "
                      "ran this model).", **fv)
  flags.DEFINE_bool("replot", False, "Measure nothing: redraw the PNG from the CSV and JSON "
                    "beside --out.", **fv)


def fit_exponent(lengths, seconds, low: int, high: int) -> dict | None:
  """Least-squares slope of log(seconds) against log(L) over low <= L <= high."""
  pairs = [(n, s) for n, s in zip(lengths, seconds) if low <= n <= high and s > 0]
  if len(pairs) < 2:
    return None
  x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
  slope, intercept = np.polyfit(x, y, 1)
  return {"exponent": float(slope), "intercept": float(intercept),
          "lengths": [p[0] for p in pairs]}


def long_run_rows(path, model: dict) -> list[dict]:
  """The flash run of a `long_run.py` JSON as a plot row, if it ran `model` (a Workload's
  `describe()`); else [] with a warning."""
  rows = []
  for point in json.loads(pathlib.Path(path).read_text())["points"].values():
    ran, flash = point.get("ran"), point.get("flash")
    if not flash:
      continue
    if any(ran.get(k) != v for k, v in model.items() if k in ran):
      logging.warning("%s ran %s, not this model %s: not drawn", path, ran, model)
      continue
    rows.append(dict(_row(LONG_RUN, point["requested"]["length"], flash), method="long run"))
  return rows


def read_rows(csv_path) -> list[dict]:
  """Rows of a CSV written by `run_scaling` (numbers parsed back)."""
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    row["length"] = int(row["length"])
    for field in ("total_seconds", "per_token_seconds"):
      row[field] = float(row[field])
  return rows


def replot(out, model: dict, long_run: str = "") -> list[dict]:
  """Redraws the PNG beside `out` from its CSV and fits (and a long run); returns the rows."""
  json_path, csv_path, png_path = plots.output_paths(out)
  rows = [r for r in read_rows(csv_path) if r["strategy"] != LONG_RUN]
  fits = json.loads(json_path.read_text()).get("fits", {})
  if long_run:
    rows += long_run_rows(long_run, model)
  plot(rows, fits, png_path, title=store_lib.key_of(**model))
  logging.info("redrew %s from %s (%d rows)", png_path, csv_path, len(rows))
  return rows


def run_scaling(work_of, lengths, flash_lengths, strategies, tau, repeats: int,
                sampling: sampling_lib.Sampling, fit_range=(4096, 65536),
                check_memory_above: int = 131072, memory_fraction: float = 0.85,
                out=None, long_run: str = "", base: int = 2) -> dict:
  """Measures every (strategy, L); returns {"rows": [...], "fits": {...}, "skipped": [...]}.

  work_of: L -> `lib.workloads.Workload` of that length (max_length >= L).
  """
  store = store_lib.Store(out)
  options = EngineOptions(tau=tau, base=base)
  flash_key = {"base": base} if base != 2 else {}  # flash's tiling base (2: older stores)
  plan = [(s, n) for n in lengths for s in strategies]
  plan += [("flash", n) for n in flash_lengths if "flash" in strategies and n not in lengths]
  rows, skipped = [], []
  for length in sorted({n for _, n in plan}):
    work = work_of(length)
    config = dict(work.describe(), length=length, repeats=repeats)
    todo = [s for s, n in plan if n == length]
    if length >= check_memory_above:
      estimate = store.run(store_lib.key_of(**config, what="estimate", strategy="flash",
                                            tau=tau, **flash_key),
                           lambda: work.estimate("flash", length, options))
      ok, why = machine.fits_in_memory(estimate["peak_bytes"], memory_fraction)
      if not ok:
        logging.warning("L=%d skipped: %s", length, why)
        skipped.append({"length": length, "reason": why})
        continue
    params = None

    def get_params():
      nonlocal params
      if params is None:
        params = work.params()
      return params

    def forward():
      entry = sampling_lib.offline_forward(work, get_params(), length, repeats)
      return {"total_seconds": entry.pop("seconds"), **entry, "method": "full",
              "sampled": False}

    entry = store.run(store_lib.key_of(**config, what="offline_forward"), forward)
    rows.append(_row("forward", length, entry))
    for strategy in todo:
      key = dict(config, what="generate", strategy=strategy,
                 tau=tau if strategy == "flash" else None,
                 **(flash_key if strategy == "flash" else {}),
                 **sampling.key(strategy, length))
      entry = store.run(store_lib.key_of(**key), lambda s=strategy: (
          sampling_lib.measure_strategy(work, get_params(), s, length, options, repeats,
                                        sampling)))
      rows.append(_row(strategy, length, entry))
  fits = {}
  for strategy in list(strategies) + ["forward"]:
    mine = sorted((r["length"], r["total_seconds"]) for r in rows if r["strategy"] == strategy)
    fit = fit_exponent([m[0] for m in mine], [m[1] for m in mine], *fit_range)
    if fit:
      fits[strategy] = fit
      logging.info("%s: total time ~ L^%.2f over L in %s", strategy, fit["exponent"],
                   fit["lengths"])
  store.set("fits", fits)
  store.set("skipped", skipped)
  json_path, csv_path, png_path = plots.output_paths(store.path)
  model = work_of(min(lengths or flash_lengths)).describe()
  if long_run:
    rows += long_run_rows(long_run, model)
  store_lib.write_csv(csv_path, rows)
  plot(rows, fits, png_path, title=store_lib.key_of(**model))
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return {"rows": rows, "fits": fits, "skipped": skipped}


def _row(strategy: str, length: int, entry: dict) -> dict:
  return {"strategy": strategy, "length": length, "total_seconds": entry["total_seconds"],
          "per_token_seconds": entry["total_seconds"] / max(length - 1, 1),
          "method": entry.get("method", "full"), "compile_seconds": entry["compile_seconds"],
          "xla_peak_bytes": entry.get("xla_memory", {}).get("peak_bytes")}


def plot(rows, fits, path, title: str = "") -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for strategy in dict.fromkeys(r["strategy"] for r in rows):
    mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["length"])
    n = [r["length"] for r in mine]
    for ax, field in zip(axes, ("per_token_seconds", "total_seconds")):
      values = [r[field] for r in mine]
      label = "offline forward (per position)" if strategy == "forward" else strategy
      if strategy in fits and field == "total_seconds":
        label += f" (~L^{fits[strategy]['exponent']:.2f})"
      if strategy == LONG_RUN:
        ax.plot(n, values, "*", ms=12, color=COLOURS["flash"], label=label + " (one run)")
        continue
      ax.plot(n, values, "-", color=COLOURS.get(strategy), label=label)
      full = [(a, b) for a, b, r in zip(n, values, mine) if r["method"] == "full"]
      part = [(a, b) for a, b, r in zip(n, values, mine) if r["method"] != "full"]
      if full:
        ax.plot(*zip(*full), "o", color=COLOURS.get(strategy))
      if part:
        ax.plot(*zip(*part), "o", mfc="none", color=COLOURS.get(strategy))
  for ax, name in zip(axes, ("time per token (s)", "total time (s)")):
    plots.log_length_axes(ax, name)
  if rows:
    axes[1].legend(fontsize=8)
  fig.suptitle(f"generation time vs L  {title}\n(hollow: sampled or extrapolated)", fontsize=9)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  lengths = [int(n) for n in f.lengths]
  flash_lengths = [int(n) for n in f.flash_lengths]
  work_of = lambda n: flags_lib.workload_from_flags(f, n)
  if f.replot:
    replot(f.out, work_of(min(lengths or flash_lengths)).describe(), f.long_run)
    return
  run_scaling(work_of, lengths, flash_lengths,
              f.strategies, flags_lib.tau(f), f.repeats,
              flags_lib.sampling_from_flags(f), tuple(int(n) for n in f.fit_range),
              f.check_memory_above, f.memory_fraction, f.out, f.long_run, int(f.base))


if __name__ == "__main__":
  define_flags()
  app.run(main)
