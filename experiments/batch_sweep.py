r"""Tokens per second of the language model against the batch size, for flash, lazy and modal,
with float32 and bfloat16 step weights.

  python -m experiments.batch_sweep                                # LM 256/8/1024, L = 1024
  python -m experiments.batch_sweep --length=4096 --batches=1,2,4,8 --repeats=3

For every batch size B, strategy and step-weight dtype (`lcsm_jax.Decoder(step_weights=...)`):
the time of generating positions 1 .. L-1 of B rows after a one-token prompt (`lib.sampling.
measure_strategy`: compiled apart, one warm-up run, the median of --repeats runs; lazy above
--sample_above measured on a sample, and the JSON says `"sampled": true`), and

  tokens_per_second = B * (L - 1) / total_seconds.

Modal runs on the model's filters distilled once per length (`lcsm_jax.distill`, order
--modal_order, the closed-form fit; its time is reported apart): a different (approximate)
model, whose per-token cost does not depend on L. bfloat16 step weights run the model with the
dense kernels (in_proj, out_proj, fc1, fc2) rounded to bfloat16; every strategy is exact for
that model. --bf16_strategies limits which strategies are also run with bfloat16 weights (the
step is the same program in every strategy).

Writes --out (JSON: "points", kept across runs so a re-run skips what is there, and "table"),
a CSV (one row per point) and a PNG (tokens/s against B) beside it.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.decoding import EngineOptions

STEP_WEIGHTS = ("float32", "bfloat16")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values, model="lm")
  flags_lib.define_sampling_flags(flag_values)
  flags.DEFINE_integer("length", 1024, "Sequence length L (prompt of 1, then L - 1 steps).",
                       **fv)
  flags.DEFINE_list("batches", ["1", "2", "4", "8", "16", "32", "64"], "Batch sizes B.", **fv)
  flags.DEFINE_list("strategies", ["flash", "lazy", "modal"], "Strategies to time.", **fv)
  flags.DEFINE_list("step_weights", list(STEP_WEIGHTS), "Step weight dtypes.", **fv)
  flags.DEFINE_list("bf16_strategies", ["flash", "lazy", "modal"], "Strategies also timed "
                    "with bfloat16 step weights.", **fv)
  flags.DEFINE_integer("modal_order", 16, "Order N of the distilled filters modal runs on.",
                       **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "batch_sweep.json")


def _check(f) -> list[int]:
  if f.model != "lm":
    raise app.UsageError("the batch sweep measures the language model (--model=lm).")
  try:
    batches = [int(b) for b in f.batches]
  except ValueError:
    raise app.UsageError(f"--batches must be integers, got {f.batches}.") from None
  if not batches or min(batches) < 1:
    raise app.UsageError(f"--batches must be integers >= 1, got {f.batches}.")
  if not set(f.step_weights) <= set(STEP_WEIGHTS) or not f.step_weights:
    raise app.UsageError(f"--step_weights must be among {STEP_WEIGHTS}, got {f.step_weights}.")
  known = {"flash", "lazy", "modal", "eager", "recompute"}
  if not set(f.strategies) <= known:
    raise app.UsageError(f"--strategies must be among {sorted(known)}, got {f.strategies}.")
  if f.length < 2:
    raise app.UsageError(f"--length must be >= 2, got {f.length}.")
  return batches


def distilled_filters(work: workloads.Workload, params, order: int):
  """`lcsm_jax.distill(params, config, order=order)` over the workload's max_length taps and
  the seconds it took."""
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  distilled = lcsm_jax.distill(params, work.config(), order=order)
  return distilled, time.perf_counter() - start


def rows_of(points: list[dict]) -> list[dict]:
  """CSV rows: one per point, the figures that the table shows."""
  return [{k: p[k] for k in ("strategy", "step_weights", "batch", "length",
                             "tokens_per_second", "per_position_seconds", "total_seconds",
                             "compile_seconds", "sampled", "load_average")} for p in points]


def plot(points: list[dict], path, title: str) -> None:
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = {"float32": "-", "bfloat16": "--"}
  for strategy in dict.fromkeys(p["strategy"] for p in points):
    for dtype in STEP_WEIGHTS:
      line = sorted((p["batch"], p["tokens_per_second"]) for p in points
                    if p["strategy"] == strategy and p["step_weights"] == dtype)
      if line:
        b, t = zip(*line)
        ax.plot(b, t, styles[dtype], marker="o", label=f"{strategy} ({dtype} step weights)")
  plots.log2_axes(ax, "batch size B", "tokens / s", title)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  batches = _check(f)
  json_path, csv_path, png_path = plots.output_paths(f.out)
  store = store_lib.Store(json_path)
  tau = flags_lib.tau(f)
  options = EngineOptions(tau=tau)
  sampling = flags_lib.sampling_from_flags(f)
  base = workloads.Workload("lm", f.layers, f.width, 1, f.inner_width, f.order, f.length)
  params = workloads.cached_params(base)
  distilled = None
  points = []
  for batch in batches:
    for strategy in f.strategies:
      for dtype in f.step_weights:
        if dtype != "float32" and strategy not in f.bf16_strategies:
          continue
        work = base.replace(batch=batch, step_weights=dtype)
        key = dict(work.describe(), what="generate", length=f.length, strategy=strategy,
                   tau=tau if strategy == "flash" else None, repeats=f.repeats,
                   **sampling.key(strategy, f.length))
        if strategy == "modal":
          key["modal_order"] = f.modal_order
          if distilled is None and store.get(store_lib.key_of(**key)) is None:
            distilled, seconds = distilled_filters(base, params, f.modal_order)
            store.set("distill", {"order": f.modal_order, "length": f.length,
                                  "seconds": seconds})
            logging.info("distilled order %d in %.1f s", f.modal_order, seconds)
          work = work.replace(distilled=distilled)

        def measure(work=work, strategy=strategy):
          load = machine.load_average()
          entry = sampling_lib.measure_strategy(work, params, strategy, f.length, options,
                                                f.repeats, sampling)
          entry["load_average"] = load
          entry["load_average_after"] = machine.load_average()
          return entry

        entry = store_lib.point(store, key, measure)
        positions = f.length - 1
        point = dict(entry, strategy=strategy, step_weights=dtype, batch=batch,
                     length=f.length,
                     tokens_per_second=batch * positions / entry["total_seconds"],
                     per_position_seconds=entry["total_seconds"] / positions)
        points.append(point)
        logging.info("B=%-3d %-6s %-8s %10.0f tokens/s  %8.1f us/position%s", batch, strategy,
                     dtype, point["tokens_per_second"], point["per_position_seconds"] * 1e6,
                     "  (sampled)" if entry.get("sampled") else "")
  store.set("table", {"machine": machine.machine(), "length": f.length,
                      "model": base.describe(), "points": rows_of(points)})
  store_lib.write_csv(csv_path, rows_of(points))
  plot(points, png_path, f"LM {f.width}/{f.layers}/{f.inner_width}, L = {f.length}, "
       f"{machine.machine()['cpu_model']}")
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
