r"""Ablations of flash generation: engine options and model sizes, each against lazy.

  python -m experiments.ablations                    # small default: L = 256
  python -m experiments.ablations --length=4096 --lm_length=4096

Around a base model (the stack: --layers x --width, batch --batch), one factor at a time:

  layer_parallel       EngineOptions.layer_parallel on / off (flash only)
  precomputed_spectra  EngineOptions.precomputed_spectra on / off (flash only)
  batch                --batches
  layers               --layer_counts
  width                --widths
  order                Hyena order of the language model (--orders; d_model --width, --layers,
                       d_inner --inner_width, at --lm_length)

Each point times flash and (except for the two option sweeps) lazy over positions [1, L), as
`lib.sampling.measure_strategy` does (lazy sampled above --sample_above), and reports the
speedup of flash over lazy. Writes --out (JSON points plus "sweeps"), a CSV and a PNG with one
panel per sweep.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from experiments.lib import flags as flags_lib
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib.workloads import Workload
from lcsm_jax.decoding import EngineOptions

SWEEPS = ("layer_parallel", "precomputed_spectra", "batch", "layers", "width", "order")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags_lib.define_sampling_flags(flag_values)
  flags.DEFINE_integer("length", 256, "Sequence length L of the stack sweeps.", **fv)
  flags.DEFINE_integer("lm_length", 256, "Sequence length L of the order sweep (the LM).", **fv)
  flags.DEFINE_list("sweeps", list(SWEEPS), f"Sweeps to run, from {SWEEPS}.", **fv)
  flags.DEFINE_list("batches", ["1", "4", "16"], "Batch sizes.", **fv)
  flags.DEFINE_list("layer_counts", ["2", "4", "8", "12", "18"], "Layer counts.", **fv)
  flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024"], "Widths D.", **fv)
  flags.DEFINE_list("orders", ["2", "3"], "Hyena orders of the language model.", **fv)
  flags.DEFINE_list("strategies", ["flash", "lazy"], "Strategies timed at every point.", **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "ablations.json")


def sweep_points(base: Workload, sweep: str, values, lm_length: int):
  """[(value, workload, options overrides, strategies allowed)] of one sweep."""
  flash_only = ("flash",)
  if sweep == "layer_parallel":
    return [(v, base, {"layer_parallel": v}, flash_only) for v in (True, False)]
  if sweep == "precomputed_spectra":
    return [(v, base, {"precomputed_spectra": v}, flash_only) for v in (True, False)]
  if sweep == "batch":
    return [(v, base.replace(batch=v), {}, None) for v in values]
  if sweep == "layers":
    return [(v, base.replace(layers=v), {}, None) for v in values]
  if sweep == "width":
    return [(v, base.replace(width=v), {}, None) for v in values]
  if sweep == "order":
    return [(v, base.replace(kind="lm", order=v, max_length=lm_length), {}, None)
            for v in values]
  raise ValueError(f"unknown sweep {sweep!r}; choose from {SWEEPS}.")


def run_ablations(base: Workload, length: int, lm_length: int, sweeps,
                  values: dict, strategies, tau, repeats: int,
                  sampling: sampling_lib.Sampling, out) -> dict:
  """Runs the sweeps; returns {sweep: [{"value", "flash_seconds", "lazy_seconds", ...}]}."""
  store = store_lib.Store(out)
  results = {}
  for sweep in sweeps:
    rows = []
    for value, work, overrides, allowed in sweep_points(base, sweep, values.get(sweep, ()),
                                                        lm_length):
      n = lm_length if work.kind == "lm" else length
      work = work.replace(max_length=n)
      options = EngineOptions(tau=tau, **overrides)
      row = {"sweep": sweep, "value": value}
      params = None
      for strategy in strategies:
        if allowed is not None and strategy not in allowed:
          continue
        key = dict(work.describe(), what="generate", length=n, strategy=strategy,
                   repeats=repeats, tau=tau if strategy == "flash" else None,
                   **({k: v for k, v in overrides.items()} if strategy == "flash" else {}),
                   **sampling.key(strategy, n))
        if store.get(store_lib.key_of(**key)) is None and params is None:
          params = work.params()
        entry = store.run(store_lib.key_of(**key), lambda s=strategy: (
            sampling_lib.measure_strategy(work, params, s, n, options, repeats, sampling)))
        row[f"{strategy}_seconds"] = entry["total_seconds"]
        row[f"{strategy}_per_token_seconds"] = entry["per_token_seconds"]
        row[f"{strategy}_method"] = entry["method"]
      if "flash_seconds" in row and "lazy_seconds" in row:
        row["speedup_vs_lazy"] = row["lazy_seconds"] / row["flash_seconds"]
      row["length"] = n
      logging.info("%s = %s: %s", sweep, value, {k: v for k, v in row.items()
                                                  if k.endswith("seconds") or k == "speedup"})
      rows.append(row)
    results[sweep] = rows
  store.set("sweeps", results)
  json_path, csv_path, png_path = plots.output_paths(store.path)
  store_lib.write_csv(csv_path, [r for rows in results.values() for r in rows])
  plot(results, png_path, base, length)
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return results


def plot(results, path, base, length: int) -> None:
  plt = plots.pyplot()
  names = [s for s in results if results[s]]
  if not names:
    return
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
  for ax, sweep in zip(axes.flat, names):
    data = results[sweep]
    labels = [str(r["value"]) for r in data]
    x = range(len(data))
    for offset, strategy, colour in ((-0.2, "flash", "C0"), (0.2, "lazy", "C1")):
      values = [r.get(f"{strategy}_seconds") for r in data]
      if any(v is not None for v in values):
        ax.bar([i + offset for i in x], [v or 0 for v in values], width=0.4, color=colour,
               label=strategy)
    for i, r in zip(x, data):
      if "speedup_vs_lazy" in r:
        ax.annotate(f"{r['speedup_vs_lazy']:.1f}x", (i, r.get("lazy_seconds", 0)),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_title(f"{sweep} (L = {data[0]['length']})", fontsize=9)
    ax.set_ylabel("generation time (s)")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle(f"ablations around {store_lib.key_of(**base.describe())}, L = {length}; "
               "labels: flash speedup over lazy", fontsize=9)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  base = flags_lib.workload_from_flags(f, f.length)
  values = {"batch": [int(v) for v in f.batches], "layers": [int(v) for v in f.layer_counts],
            "width": [int(v) for v in f.widths], "order": [int(v) for v in f.orders]}
  run_ablations(base, f.length, f.lm_length, f.sweeps, values, f.strategies,
                flags_lib.tau(f), f.repeats, flags_lib.sampling_from_flags(f),
                f.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
