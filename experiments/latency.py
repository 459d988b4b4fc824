r"""Per-token latency of flash generation: its distribution and where the spikes fall.

  python -m experiments.latency                      # small default: stack, L = 1024
  python -m experiments.latency --length=65536 --passes=3

Flash's work is uneven: after the step at position i it adds one block of size U = lowbit(i)
(the largest power of two dividing i), so most tokens are cheap and every 2^k-th one pays a
block of 2^k. Two measurements, no host callbacks in either:

- measured: a Python loop of single compiled positions (the model's step, then the block, then
  the next pending outputs: the body of the engine's token loop, `mixing.token_loop`), the
  state carried between calls (donated, so not copied), each call timed to completion
  (`block_until_ready`). This is the latency a caller that wants every token as it is made
  would see, dispatch included. --passes passes after one warm-up pass; per position the median.
- in_loop: the compiled token loop's total time (no dispatch), split by block size: each
  level's blocks are timed apart (all blocks of that level in one compiled loop, at their real
  positions), the rest is the per-position step cost s, so a position's in-loop latency is
  s + c(lowbit(i)).

Writes --out (JSON: summary statistics, per-class table, the largest spikes), a CSV of every
position (position, U, measured seconds, in-loop model seconds) and a PNG (latency vs position;
latency per block size).
"""

from __future__ import annotations

import functools
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from experiments import benchmarking
from lcsm_jax import engine
from lcsm_jax import schedule
from lcsm_jax.engine import EngineOptions


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  benchmarking.define_model_flags(flag_values)
  flags.DEFINE_integer("length", 1024, "Sequence length L (prompt of 1, L - 1 positions).",
                       **fv)
  flags.DEFINE_integer("passes", 2, "Timed passes of the single-position loop (after one "
                       "warm-up pass); per position the median.", **fv)
  flags.DEFINE_integer("spikes", 10, "Largest latencies listed.", **fv)
  flags.DEFINE_string("out", str(benchmarking.RESULTS_DIR / "latency.json"), "JSON output; the "
                      "CSV and PNG are written beside it.", **fv)


@functools.partial(jax.jit, static_argnames=("online", "mixer", "num_steps", "vocab"))
def _start(params, tables, prompt, *, online, mixer, num_steps, vocab):
  """State after a prompt: (flash state, model carry, next input, pending outputs of r = 0)."""
  outputs, prompt_inputs, carry = online.prefill(params, prompt)
  state = mixer.init(tables, prompt_inputs, num_steps)
  return state, carry, _next_input(outputs[:, -1], vocab), mixer.pending(tables, state, 0)


def _next_input(output, vocab):
  """The stack feeds its output back; the language model its greedy token."""
  if vocab is None:
    return output
  return jnp.argmax(output[:, :vocab], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("online", "mixer", "plan", "vocab"),
                   donate_argnames=("state",))
def _position(params, tables, constants, state, carry, x, pending, r, *, online, mixer, plan,
              vocab):
  """One position r: the body of `mixing.token_loop` with flash's update."""
  carry, inputs, output = online.step(params, constants, carry, x, pending)
  state = mixer.update(tables, state, r, inputs, plan)
  return state, carry, _next_input(output, vocab), mixer.pending(tables, state, r + 1)


@functools.partial(jax.jit, static_argnames=("mixer", "level", "out_len", "count"),
                   donate_argnames=("state",))
def _level(tables, state, *, mixer, level, out_len, count):
  """All `count` blocks of `level` at their positions i = U, 3U, 5U, ... in one loop."""
  size = 1 << level
  return lax.fori_loop(0, count, lambda j, s: mixer.block(tables, s, level, size + 2 * size * j,
                                                          out_len), state)


def lowbits(num_steps: int) -> np.ndarray:
  """U = lowbit(i) of the block after online position r = i - 1 (0 for the last position,
  which adds no block)."""
  i = np.arange(1, num_steps + 1, dtype=np.int64)
  return np.where(i < num_steps, i & -i, 0)


def run_latency(work: benchmarking.Workload, length: int, tau, passes: int, repeats: int,
                spikes: int, out) -> dict:
  """Measures both ways; returns the summary (also stored in `out` under its config key)."""
  store = benchmarking.Store(out)
  key = benchmarking.key_of(**work.describe(), length=length, tau=tau, passes=passes,
                            repeats=repeats)
  summary = store.run(key, lambda: _measure(work, length, tau, passes, repeats, spikes,
                                            store.path))
  return summary


def _measure(work, length, tau, passes, repeats, spikes, path) -> dict:
  options = EngineOptions(tau=tau)
  num_steps = length - 1
  plan = schedule.FlashPlan(num_steps)
  online = work.online()
  mixer = work.mixer("flash", num_steps, options)
  vocab = work.config().vocab_size if work.kind == "lm" else None
  params = work.params()
  tables, constants = jax.block_until_ready(
      engine.prepare_tables(params, online=online, mixer=mixer, total=length))
  prompt = work.inputs(length)[:, :1]
  start = functools.partial(_start, params, tables, prompt, online=online, mixer=mixer,
                            num_steps=num_steps, vocab=vocab)
  position = _position.lower(params, tables, constants, *start(), jnp.int32(0), online=online,
                             mixer=mixer, plan=plan, vocab=vocab).compile()

  # measured: single compiled positions from Python
  latencies = np.zeros((max(passes, 1), num_steps))
  for p in range(max(passes, 1) + 1):  # pass 0 is the warm-up
    state, carry, x, pending = jax.block_until_ready(start())
    began = time.perf_counter()
    for r in range(num_steps):
      t0 = time.perf_counter()
      state, carry, x, pending = position(params, tables, constants, state, carry, x, pending,
                                          jnp.int32(r))
      pending.block_until_ready()
      if p:
        latencies[p - 1, r] = time.perf_counter() - t0
    logging.info("pass %d%s: %.3f s", p, " (warm-up)" if not p else "",
                 time.perf_counter() - began)
  del state
  measured = np.median(latencies, axis=0)

  # in_loop: the compiled loop's total, split by level
  total = benchmarking.measure_strategy(work, params, "flash", length, options, repeats)
  sizes = lowbits(num_steps)
  level_seconds = {}
  for level in range(plan.num_levels):
    size = 1 << level
    count = int((sizes == size).sum())
    if not count:
      continue
    state = jax.block_until_ready(start()[0])
    run = _level.lower(tables, state, mixer=mixer, level=level,
                       out_len=plan.rows_written(level), count=count).compile()
    state = jax.block_until_ready(run(tables, state))  # warm-up
    times = []
    for _ in range(max(repeats, 1)):
      t0 = time.perf_counter()
      state = jax.block_until_ready(run(tables, state))
      times.append(time.perf_counter() - t0)
    level_seconds[size] = float(np.median(times)) / count
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
  json_path, csv_path, png_path = benchmarking.output_paths(path)
  benchmarking.write_csv(csv_path, [
      {"position": r + 1, "block_size": int(sizes[r]), "measured_seconds": float(measured[r]),
       "in_loop_model_seconds": float(model[r])} for r in range(num_steps)])
  plot(measured, model, sizes, per_class, png_path, summary["config"])
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)
  return summary


def plot(measured, model, sizes, per_class, path, config) -> None:
  plt = benchmarking.pyplot()
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
  ax.set_title(benchmarking.key_of(**config), fontsize=8)
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
  benchmarking.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  run_latency(benchmarking.workload_from_flags(f, f.length), f.length,
              benchmarking.parse_tau(f.tau), f.passes, f.repeats, f.spikes, f.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
