r"""Generation on a device mesh: bytes per device and tokens/s against the mesh shape.

  python -m experiments.sharding                    # (a) bytes, (b) tokens/s: ~2 min on 2 cores
  python -m experiments.sharding --real_run         # (c) large-1m to 2^20 on (1, 4); see (c)

(a) For the `large-1m` preset (l_max raised to --positions = 2^20) and every mesh shape of
--meshes (data, model) over --host_devices host CPU devices: the bytes each device holds of
the parameters (by the model's `param_partition`), of the strategy's tables and of the decoding
state after a one-token prompt, from shapes only: the one-device Decoder's `state_shape` and
`abstract_tables` (nothing is allocated), their logical layouts (`Decoder.engine(batch)`'s
`state_layout`, the strategy's `table_layout`) mapped onto the mesh by `decoding.sharding`, and
each array's `NamedSharding.shard_shape`. Batches that do not divide over the data axis are
skipped.
(b) tokens/s of greedy generation with a small model on the same meshes (host CPU devices
share this machine's cores: no speed-up is expected here; the same runner measures scaling on
a multi-device host).
(c) With --real_run: the large-1m model on a (1, 4) mesh up to --positions: a prompt of
--real_prompt tokens, then generation of the rest in calls of --real_chunk tokens, with the
time of each phase, the process's peak resident memory, each device's bytes (arrays held
plus XLA's per-device estimate of the prefill) and XLA's per-program estimates. The 2^20 run
with a prompt of 2^20 - 4096 tokens needs ~22 GB and ~9 min on 2 cores:

  python -m experiments.sharding --real_run --positions=1048576 --real_prompt=1044480 \
      --real_chunk=4096 --nospeed

Writes --out (JSON) and a PNG beside it (bytes per device vs mesh; tokens/s vs mesh).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments.lib import machine
from experiments.lib import plots
from experiments.lib import store as store_lib

MESHES = ("1x1", "1x2", "1x4", "1x8", "2x4", "8x1")  # data x model


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("host_devices", 8, "Host CPU devices (jax_num_cpu_devices).", **fv)
  flags.DEFINE_list("meshes", list(MESHES), "Mesh shapes dataxmodel, e.g. 2x4.", **fv)
  flags.DEFINE_string("preset", "large-1m", "Model preset for the bytes per device.", **fv)
  flags.DEFINE_integer("positions", 2**20, "Positions (max_length) of (a) and (c).", **fv)
  flags.DEFINE_list("strategies", ["flash", "lazy", "eager"], "Strategies of (a).", **fv)
  flags.DEFINE_list("batches", ["1", "8"], "Batch sizes of (a).", **fv)
  flags.DEFINE_integer("tau", 1024, "Flash block threshold (fixed: no crossover measurement).",
                       **fv)
  flags.DEFINE_bool("speed", True, "Measure (b) tokens/s.", **fv)
  flags.DEFINE_integer("speed_width", 64, "(b): d_model of the small model.", **fv)
  flags.DEFINE_integer("speed_batch", 8, "(b): batch rows.", **fv)
  flags.DEFINE_integer("speed_tokens", 128, "(b): tokens generated per timed call.", **fv)
  flags.DEFINE_integer("repeats", 2, "(b): timed calls per mesh (the fastest is kept).", **fv)
  flags.DEFINE_bool("real_run", False, "(c): run large-1m up to --positions on --real_mesh "
                    "(at 2^20 from a 2^20 - 4096 prompt: ~22 GB, ~9 min).", **fv)
  flags.DEFINE_integer("real_chunk", 65536, "(c): tokens per generate call.", **fv)
  flags.DEFINE_integer("real_prompt", 1, "(c): prompt tokens (1: generate every position; "
                       "--positions - 64: the 2^20 state from a prompt, 64 tokens generated).",
                       lower_bound=1, **fv)
  flags.DEFINE_string("real_mesh", "1x4", "(c): the mesh, dataxmodel.", **fv)
  flags.DEFINE_string("out", str(store_lib.RESULTS_DIR / "sharding" / "sharding.json"),
                      "JSON output; the PNG is written beside it.", **fv)


# -- pure helpers --

def mesh_shape(text: str) -> tuple[int, int]:
  """'2x4' -> (2, 4) (data, model); ValueError naming the text otherwise."""
  parts = text.split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
    raise ValueError(f"a mesh shape is 'dataxmodel' with positive integers (e.g. 2x4), got "
                     f"{text!r}.")
  return int(parts[0]), int(parts[1])


def bytes_per_device(shapes: Any, shardings: Any) -> int:
  """Bytes one device holds of `shapes` (a pytree of arrays or ShapeDtypeStructs) placed by
  `shardings` (the same pytree of shardings, each with `shard_shape(global_shape)`): the sum of
  every leaf's shard size times its item size. Nothing is allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(shapes)
  placed = jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
  if len(leaves) != len(placed):
    raise ValueError(f"{len(leaves)} arrays but {len(placed)} shardings.")
  return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, placed))


def global_bytes(shapes: Any) -> int:
  """Bytes of every leaf of `shapes` (arrays or ShapeDtypeStructs)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def divides(batch: int, shape: tuple[int, int]) -> bool:
  return batch % shape[0] == 0


# -- (a) bytes per device --

def mesh_of(shape: tuple[int, int]):
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if math.prod(shape) > len(devices):
    raise ValueError(f"mesh {shape} needs {math.prod(shape)} devices; JAX sees {len(devices)} "
                     "(raise --host_devices).")
  return jax.sharding.Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape),
                           ("data", "model"))


def large_config(preset: str, positions: int):
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  config = lcsm_jax.preset(preset)
  return config.replace(l_max=max(config.l_max, positions))


def byte_rows(config, params, strategies: Iterable[str], batches: Iterable[int],
              meshes: Iterable[tuple[int, int]], positions: int, tau: int) -> list[dict]:
  """(a): one row per (strategy, batch, mesh): global and per-device bytes of parameters,
  strategy tables and state (engine carry and strategy state)."""
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  from lcsm_jax import models  # pylint: disable=g-import-not-at-top
  from lcsm_jax.decoding import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  rows = []
  adapter = models.online_model(config)
  param_layout = adapter.param_partition(params)
  for strategy in strategies:
    decoder = lcsm_jax.Decoder(params, config, strategy, positions, tau=tau, check_memory=False,
                               check_finite=False)
    tables = decoder.abstract_tables().strategy
    for batch in batches:
      engine = decoder.engine(batch)
      state = decoder.state_shape(batch, 1).engine
      state_layout = engine.state_layout(state)
      table_layout = engine.strategy.table_layout(tables)
      for shape in meshes:
        if not divides(batch, shape):
          continue
        sharding = sharding_lib.create(mesh_of(shape), ("data", "model"))
        parts = {"params": (params, param_layout), "tables": (tables, table_layout),
                 "state": (state, state_layout)}
        row = {"strategy": strategy, "batch": batch, "mesh": list(shape),
               "devices": math.prod(shape), "positions": positions}
        for name, (tree, layout) in parts.items():
          row[f"{name}_bytes"] = global_bytes(tree)
          row[f"{name}_bytes_per_device"] = bytes_per_device(
              tree, sharding_lib.shardings(sharding, tree, layout))
        rows.append(row)
        logging.info("%s batch %d mesh %s: state %.2f GiB/device (of %.2f), params %.1f MiB, "
                     "tables %.2f GiB", strategy, batch, shape,
                     row["state_bytes_per_device"] / 2**30, row["state_bytes"] / 2**30,
                     row["params_bytes_per_device"] / 2**20,
                     row["tables_bytes_per_device"] / 2**30)
  return rows


# -- (b) tokens/s --

def speed_rows(meshes: Iterable[tuple[int, int]], width: int, batch: int, num_tokens: int,
               repeats: int, tau: int) -> list[dict]:
  """(b): greedy tokens/s (batch x tokens / s, compile excluded) of a small model per mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  config = lcsm_jax.HyenaConfig(vocab_size=16, d_model=width, n_layer=2, d_inner=2 * width,
                                l_max=1024, order=2, filter_order=16)
  params = lcsm_jax.init_params(config, jax.random.key(0))
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (batch, 16), 0, config.vocab_size))
  rows = []
  for shape in meshes:
    if not divides(batch, shape) or width % shape[1]:
      continue
    mesh = None if shape == (1, 1) else mesh_of(shape)
    decoder = lcsm_jax.Decoder(params, config, "flash", 16 + num_tokens * (repeats + 1),
                               tau=tau, check_memory=False, mesh=mesh)
    state = decoder.prefill(prompt)
    result, state = decoder.generate(state, num_tokens, temperature=0)  # compiles
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      result, state = decoder.generate(state, num_tokens, temperature=0)
      jax.block_until_ready(result.tokens)
      best = min(best, time.perf_counter() - start)
    rows.append({"mesh": list(shape), "devices": math.prod(shape), "width": width,
                 "batch": batch, "tokens": num_tokens, "seconds": best,
                 "tokens_per_s": batch * num_tokens / best})
    logging.info("mesh %s: %.0f tokens/s", shape, rows[-1]["tokens_per_s"])
  return rows


# -- (c) the real run --

def real_run(config, params, positions: int, chunk: int, tau: int, prompt_length: int = 1,
             shape: tuple[int, int] = (1, 4)) -> dict:
  """(c): large-1m on a mesh of `shape` up to `positions`: a prompt of `prompt_length` tokens
  (random ids; 1: generation all the way), then greedy generation of the rest in calls of
  `chunk` tokens, the state donated from call to call.

  A long prompt reaches 2^20 positions in the time 2 cores allow (host devices synchronise
  every token: ~10 ms per token on (1, 4), 2.2 h or more for 2^20 generated tokens): the
  tables are the same, and the prefill holds every prompt position's convolution inputs (8
  GiB at 2^20, what the state of a run generated token by token holds) before it reduces them
  to their contribution to the positions still to come. The tables then skip the precomputed
  spectra (they only speed up generation).

  Peak per device: the bytes of the arrays each device holds once the tables exist (parameters,
  tables) plus XLA's per-device estimate of the prefill program (its outputs and temporaries);
  the process's peak RSS (every host device, the runtime, compiled code) beside it."""
  import jax  # pylint: disable=g-import-not-at-top
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  options = dict(base=2, precomputed_spectra=False) if prompt_length > 1 else {}
  decoder = lcsm_jax.Decoder(params, config, "flash", positions, tau=tau, mesh=mesh_of(shape),
                             donate_state=True, **options)
  generated = positions - prompt_length
  estimate = decoder.estimate_memory(1, prompt_length, min(chunk, generated) or None)
  phases = {}
  start = time.perf_counter()
  jax.block_until_ready(decoder.tables)
  phases["tables_s"] = time.perf_counter() - start
  held = live_bytes_per_device()
  prefill_bytes = estimate["prefill (state included)"]
  prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_length))
  state = decoder.prefill(prompt.astype(np.int32))
  jax.block_until_ready(state)
  phases["prefill_s"] = time.perf_counter() - start - phases["tables_s"]
  per_device_after_prefill = live_bytes_per_device()
  left = generated
  while left:
    count = min(chunk, left)
    result, state = decoder.generate(state, count, temperature=0)
    jax.block_until_ready(result.tokens)
    left -= count
    logging.info("%d of %d tokens, %.0f s", generated - left, generated,
                 time.perf_counter() - start)
  seconds = time.perf_counter() - start
  phases["generation_s"] = seconds - phases["tables_s"] - phases["prefill_s"]
  peak = machine.max_rss_bytes()
  return {"mesh": list(shape), "positions": positions, "prompt_length": prompt_length,
          "generated_tokens": generated, "seconds": seconds, **phases,
          "options": options, "process_peak_rss_bytes": peak,
          "peak_rss_bytes_per_device": peak / math.prod(shape),
          "held_bytes_per_device_before_prefill": held,
          "live_bytes_per_device_after_prefill": per_device_after_prefill,
          "peak_bytes_per_device": {d: b + prefill_bytes for d, b in held.items()},
          "xla_estimate_bytes": estimate, "tokens_in_vocabulary": bool(np.all(
              np.asarray(result.tokens) < config.vocab_size))}


def live_bytes_per_device() -> dict[str, int]:
  """Bytes of every live JAX array's shards, by device (what the devices hold now), from the
  shardings' shard shapes: reading `shard.data` would make (and keep) an array per shard,
  which the next call would count again."""
  import jax  # pylint: disable=g-import-not-at-top
  held: dict[str, int] = {}
  for array in jax.live_arrays():
    size = math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
    for device in array.sharding.addressable_devices:
      held[str(device)] = held.get(str(device), 0) + size
  return held


def plot(byte_rows_: list[dict], speed: list[dict], path) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for strategy in dict.fromkeys(r["strategy"] for r in byte_rows_):
    mine = [r for r in byte_rows_ if r["strategy"] == strategy and r["batch"] == 1]
    labels = [f"{r['mesh'][0]}x{r['mesh'][1]}" for r in mine]
    axes[0].plot(labels, [r["state_bytes_per_device"] / 2**30 for r in mine], "-o",
                 ms=7 - 2 * len(axes[0].lines), label=f"{strategy} state (batch 1)")
  flash = [r for r in byte_rows_ if r["batch"] == 1 and r["strategy"] == "flash"]
  if flash:
    labels = [f"{r['mesh'][0]}x{r['mesh'][1]}" for r in flash]
    axes[0].plot(labels, [r["tables_bytes_per_device"] / 2**30 for r in flash], "C0:s",
                 label="flash tables (filters, spectra)")
    axes[0].plot(labels, [r["params_bytes_per_device"] / 2**30 for r in flash], "k--o",
                 label="parameters (filter positional tables replicated)")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("mesh (data x model)")
  axes[0].set_ylabel("GiB per device")
  axes[0].set_title("large-1m at 2^20 positions: bytes per device", fontsize=9)
  axes[0].legend(fontsize=7)
  axes[0].grid(True, which="both", alpha=0.3)
  if speed:
    axes[1].bar([f"{r['mesh'][0]}x{r['mesh'][1]}" for r in speed],
                [r["tokens_per_s"] for r in speed])
    axes[1].set_xlabel("mesh (data x model)")
    axes[1].set_ylabel("tokens/s")
    axes[1].set_title(f"small model (d_model {speed[0]['width']}, batch {speed[0]['batch']}), "
                      f"host CPU devices on {machine.machine()['cpus']} cores", fontsize=9)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  import jax  # pylint: disable=g-import-not-at-top
  import lcsm_jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update("jax_num_cpu_devices", f.host_devices)
  except RuntimeError as e:  # JAX already started (e.g. under pytest): use what it has
    logging.warning("--host_devices %d not applied (%s); %d devices", f.host_devices, e,
                    len(jax.devices()))
  meshes = [mesh_shape(m) for m in f.meshes]
  meshes = [m for m in meshes if math.prod(m) <= len(jax.devices())]
  out = store_lib.Store(f.out)
  config = large_config(f.preset, f.positions)
  params = lcsm_jax.init_params(config, jax.random.key(0))
  rows = byte_rows(config, params, f.strategies, [int(b) for b in f.batches], meshes,
                   f.positions, f.tau)
  out.set("bytes", rows)
  if f.speed:
    out.set("speed", speed_rows(meshes, f.speed_width, f.speed_batch, f.speed_tokens,
                                f.repeats, f.tau))
  speed = out.data.get("speed", [])  # --nospeed keeps (and plots) the stored rows
  if f.real_run:
    out.set("real_run", real_run(config, params, f.positions, f.real_chunk, f.tau,
                                  f.real_prompt, mesh_shape(f.real_mesh)))
  json_path, _, png_path = plots.output_paths(out.path)
  plot(rows, speed, png_path)
  logging.info("wrote %s, %s", json_path, png_path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
