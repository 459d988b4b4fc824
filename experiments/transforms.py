r"""A flash block's transforms by FFT vs by the DFT matrices, per block size U, on this machine.

  python -m experiments.transforms                        # U = 16 .. 256 over 2048 rows
  taskset -c 0 python -m experiments.transforms           # pinned: a point of its own

For U = --sizes, a compiled loop of --count trips, each: a window of U inputs per row (moving
with the trip, so nothing is hoisted), its zero-padded 2U-point spectrum
(`lcsm_jax.decoding.blocks.input_spectrum`), a product with a filter spectrum, and the second
half of the inverse (`blocks.outputs_from_spectrum`), over --rows rows (streams x batch x
channels: 2048 for the 8 x 256 stack); once with `by_matmul=False` (XLA's FFT) and once with
`by_matmul=True` (products with `blocks.dft_matrices`). The engine uses the matrices up to
`blocks.MATMUL_DFT_MAX`; the summary says where they won here. Under `taskset` (fewer CPUs
than the machine's) a run is its own point (`cpus_used` in its key): XLA:CPU runs its dots on
every core it has and its FFT on one.

Writes --out (JSON: seconds per trip of both, their ratio, the largest U where the matrices
won), a CSV of the table and a PNG (time per trip vs U).
"""

from __future__ import annotations

import functools
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from experiments.lib import flags as flags_lib
from experiments.lib import machine as machine_lib
from experiments.lib import plots
from experiments.lib import store as store_lib
from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.tuning.timing import median_seconds

METHODS = {"fft": False, "matmul": True}  # name: by_matmul


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("sizes", ["16", "32", "64", "128", "256"], "Block sizes U.", **fv)
  flags.DEFINE_integer("rows", 2048, "Rows transformed at once (streams x batch x channels).",
                       lower_bound=1, **fv)
  flags.DEFINE_integer("count", 100, "Trips of the timed loop.", lower_bound=1, **fv)
  flags.DEFINE_integer("repeats", 5, "Timed runs of the loop (median) after a warm-up.",
                       lower_bound=1, **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "schedule" / "transforms.json")


@functools.lru_cache(maxsize=32)
def _loop(size: int, by_matmul: bool, count: int):
  @jax.jit
  def run(buffer, filter_spectrum):  # buffer (rows, size + count)
    def trip(j, acc):
      window = lax.dynamic_slice_in_dim(buffer, j, size, axis=1)
      spectrum = blocks_lib.input_spectrum(window, by_matmul) * filter_spectrum
      return acc + blocks_lib.outputs_from_spectrum(spectrum, size, by_matmul)
    return lax.fori_loop(0, count, trip, jnp.zeros((buffer.shape[0], size), jnp.float32))
  return run


def time_transforms(size: int, rows: int, by_matmul: bool, count: int, repeats: int) -> dict:
  """Seconds per trip (forward transform, product, inverse over `rows` rows of U = `size`)."""
  rng = np.random.default_rng(size)
  buffer = jnp.asarray(rng.standard_normal((rows, size + count), np.float32))
  spectrum = jnp.asarray(rng.standard_normal((rows, size + 1))
                         + 1j * rng.standard_normal((rows, size + 1)), jnp.complex64)
  run = _loop(size, by_matmul, count)
  seconds, _ = median_seconds(lambda: run(buffer, spectrum), repeats)
  return {"seconds": seconds / count}


def parse_sizes(values) -> list[int]:
  sizes = [int(v) for v in values]
  if not sizes or any(s < 1 for s in sizes):
    raise ValueError(f"sizes must be positive integers, got {values}.")
  return sizes


def plot(table: dict[int, dict], path, title: str) -> None:
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  sizes = sorted(table)
  for method in METHODS:
    ax.plot(sizes, [table[u][method] * 1e6 for u in sizes], marker="o", label=method)
  ax.axvline(blocks_lib.MATMUL_DFT_MAX, color="gray", ls=":",
             label=f"MATMUL_DFT_MAX = {blocks_lib.MATMUL_DFT_MAX}")
  plots.log2_axes(ax, "block size U (2U-point transforms)",
                  "us per forward + product + inverse", title)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  sizes = parse_sizes(f.sizes)
  json_path, csv_path, png_path = plots.output_paths(f.out)
  store = store_lib.Store(json_path)
  cpus = machine_lib.cpus_used()
  pinned = {"cpus_used": cpus} if cpus is not None and cpus < (os.cpu_count() or cpus) else {}
  table = {}
  for size in sizes:
    table[size] = {}
    for method, by_matmul in METHODS.items():
      key = store_lib.key_of(what="transforms", size=size, method=method, rows=f.rows,
                             count=f.count, repeats=f.repeats, **pinned)
      table[size][method] = store.run(key, lambda s=size, m=by_matmul: time_transforms(
          s, f.rows, m, f.count, f.repeats))["seconds"]
    table[size]["matmul_over_fft"] = table[size]["matmul"] / table[size]["fft"]
    logging.info("U=%-5d fft %9.1f us  matmul %9.1f us  (%.2fx)", size,
                 table[size]["fft"] * 1e6, table[size]["matmul"] * 1e6,
                 table[size]["matmul_over_fft"])
  wins = [u for u in sizes if table[u]["matmul_over_fft"] < 1]
  summary = {"rows": f.rows, "cpus_used": cpus, "matmul_dft_max": blocks_lib.MATMUL_DFT_MAX,
             "largest_matmul_win": max(wins, default=0),
             "table": {str(u): row for u, row in table.items()}}
  store.set("summary" + (f"_cpus_{cpus}" if pinned else ""), summary)
  store_lib.write_csv(csv_path, [dict(size=u, **table[u]) for u in sizes])
  plot(table, png_path, f"{f.rows} rows, {cpus} CPUs, "
       f"{machine_lib.machine()['cpu_model']}")
  logging.info("matrices won up to U = %d here (the engine uses them up to %d); wrote %s, %s, "
               "%s", summary["largest_matmul_win"], blocks_lib.MATMUL_DFT_MAX, json_path,
               csv_path, png_path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
