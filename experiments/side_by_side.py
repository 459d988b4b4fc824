r"""Per-token time of several generation configurations, measured side by side in rounds.

  python -m experiments.side_by_side                  # LM 256/8/1024 at 16K: modal, flash, bare
  python -m experiments.side_by_side --model=lm --length=16384 --rounds=5 \
      --configs=modal,flash,bare,modal:bfloat16,flash:bfloat16
  python -m experiments.side_by_side --model=stack --length=16384 --rounds=9 \
      --configs=flash,offline --reference=offline     # flash / offline forward, per round

On a shared machine the speed of a run drifts by tens of percent within minutes, so a ratio
taken from two runs made one after the other says little. Here every configuration is compiled
and warmed up first; then each round runs every configuration once (positions 1 .. L-1 after
a one-token prompt, as `lib.workloads` programs: the stack in a `Rollout`, the language model
teacher forced through `Decoder.score`), the order rotated from round to round. Reported per
configuration: the median, min and max of its rounds; and per pair with --reference: the
ratio reference / configuration of every round, and its median (> 1: faster than the
reference).

A configuration is `strategy[:step_weights]`: a registered strategy ('flash', 'modal', 'lazy',
'eager', 'recompute'; each run in full, so keep the slow ones to short lengths), 'bare' (the
same token loop with the long convolutions removed: `experiments.distill.bare_program`, float32
step weights only) or 'offline' (one parallel forward over the L positions, FFT convolutions:
`Workload.forward`, the reference of `bench_generate`'s "x offline forward"), and, for the
language model, 'float32' (default) or 'bfloat16' step weights
(`lcsm_jax.Decoder(step_weights=...)`). Modal runs on random order --modal_order filters (its
per-token cost does not depend on their values; `experiments.distill.random_modal_filters`).

Writes --out (JSON: the machine, the flags, every round's seconds, the summary), a CSV (one row
per configuration and round) and a PNG (per-token time of every round) beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import distill as distill_lib
from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import plots
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.decoding import EngineOptions
from lcsm_jax.decoding import strategies as strategies_lib
from lcsm_jax.tuning.timing import median_seconds

STEP_WEIGHTS = ("float32", "bfloat16")
EXTRA_CONFIGS = ("bare", "offline")  # configurations that are not strategies


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values, model="lm", with_tau=True, repeats=1)
  flags.DEFINE_integer("length", 16384, "Sequence length L (prompt of 1, then L - 1 steps).",
                       **fv)
  flags.DEFINE_list("configs", ["modal", "flash", "bare"], "Configurations, "
                    "strategy[:step_weights] (see the module docstring).", **fv)
  flags.DEFINE_string("reference", "flash", "The configuration every ratio is taken against "
                      "('' for none).", **fv)
  flags.DEFINE_integer("rounds", 5, "Rounds (each runs every configuration once).", **fv)
  flags.DEFINE_integer("modal_order", 16, "Order N of modal's filters.", **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "side_by_side.json")


@dataclasses.dataclass(frozen=True)
class Config:
  """One configuration: a strategy (or 'bare', 'offline') and the step's weight dtype."""

  strategy: str
  step_weights: str = "float32"

  @property
  def name(self) -> str:
    return self.strategy if self.step_weights == "float32" else (
        f"{self.strategy}:{self.step_weights}")

  @classmethod
  def parse(cls, text: str, model: str) -> "Config":
    strategy, _, dtype = text.strip().partition(":")
    dtype = dtype or "float32"
    known = EXTRA_CONFIGS + strategies_lib.STRATEGIES
    if strategy not in known:
      raise ValueError(f"--configs: unknown strategy {strategy!r} in {text!r}; one of {known}.")
    if dtype not in STEP_WEIGHTS:
      raise ValueError(f"--configs: step weights must be one of {STEP_WEIGHTS}, got {dtype!r} "
                       f"in {text!r}.")
    if dtype != "float32" and (model != "lm" or strategy in EXTRA_CONFIGS):
      raise ValueError(f"--configs: {text!r}: bfloat16 step weights apply to the language "
                       "model's strategies only (not the stack, not 'bare' or 'offline').")
    return cls(strategy, dtype)


def parse_configs(f) -> list[Config]:
  """The --configs of flag values `f`, checked (with --reference, --rounds and --length)."""
  configs = [Config.parse(text, f.model) for text in f.configs if text.strip()]
  names = [c.name for c in configs]
  if not configs or len(set(names)) != len(names):
    raise ValueError(f"--configs must name distinct configurations, got {f.configs}.")
  if f.reference and f.reference not in names:
    raise ValueError(f"--reference {f.reference!r} is not one of --configs {names}.")
  if f.rounds < 1:
    raise ValueError(f"--rounds must be >= 1, got {f.rounds}.")
  if f.length < 2:
    raise ValueError(f"--length must be >= 2 (a prompt of one, then L - 1 steps), got "
                     f"{f.length}.")
  return configs


def program(config: Config, work: workloads.Workload, params, length: int,
            options: EngineOptions, modal_order: int) -> workloads.Program:
  """The compiled program of `config` for positions 1 .. length - 1."""
  if config.strategy == "bare":
    return distill_lib.bare_program(work, params, length)
  if config.strategy == "offline":
    return work.forward(params, length)
  work = work.replace(step_weights=config.step_weights)
  if config.strategy == "modal":
    filters = distill_lib.random_modal_filters(work.streams, work.width, modal_order)
    if work.kind == "stack":
      return distill_lib.modal_program(work, params, length, filters)
    work = work.replace(distilled=filters)
  return work.program(params, config.strategy, length, 1, options)


def measure_rounds(programs: dict[str, workloads.Program], rounds: int
                   ) -> dict[str, list[float]]:
  """Seconds of every program in each round: one warm-up run each, then `rounds` rounds that
  run every program once, the order rotated by one each round."""
  names = list(programs)
  for name in names:
    jax.block_until_ready(programs[name].run())
  seconds = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      seconds[name].append(median_seconds(programs[name].run, 1, warmup=0)[0])
    logging.info("round %d: %s", r + 1, ", ".join(f"{n} {seconds[n][-1]:.3f} s" for n in names))
  return seconds


def round_ratio(seconds: dict[str, list[float]], numerator: str, denominator: str) -> float:
  """The median over rounds of seconds[numerator] / seconds[denominator] (same round)."""
  return statistics.median(a / b for a, b in zip(seconds[numerator], seconds[denominator]))


def summary(seconds: dict[str, list[float]], positions: int, reference: str | None
            ) -> dict[str, Any]:
  """Per configuration: median / min / max seconds and per-token microseconds, and the median
  over rounds of every other configuration's time over its own (`slower_by`: > 1 where the
  other is slower); with a reference, the per-round ratios reference / configuration and
  their median."""
  out = {}
  for name, runs in seconds.items():
    median = statistics.median(runs)
    row = {"median_seconds": median, "min_seconds": min(runs), "max_seconds": max(runs),
           "per_token_us": median / positions * 1e6,
           "slower_by": {other: round_ratio(seconds, other, name) for other in seconds
                         if other != name}}
    if reference:
      ratios = [ref / own for ref, own in zip(seconds[reference], runs)]
      row["ratios_vs_reference"] = ratios
      row["median_ratio_vs_reference"] = statistics.median(ratios)
    out[name] = row
  return out


def plot(seconds: dict[str, list[float]], positions: int, path, title: str) -> None:
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (name, runs) in enumerate(seconds.items()):
    ax.plot([i] * len(runs), [s / positions * 1e6 for s in runs], "o", alpha=0.7)
  ax.set_xticks(range(len(seconds)), list(seconds))
  ax.set_ylabel("us per token (each round)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, axis="y", alpha=0.3)
  plots.save_figure(fig, path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  configs = parse_configs(f)
  json_path, csv_path, png_path = plots.output_paths(f.out)
  work = flags_lib.workload_from_flags(f, f.length)
  params = workloads.cached_params(work)
  options = EngineOptions(tau=flags_lib.tau(f))
  programs, compile_seconds = {}, {}
  for config in configs:
    programs[config.name] = program(config, work, params, f.length, options, f.modal_order)
    compile_seconds[config.name] = programs[config.name].compile_seconds
  load = machine.load_average()
  seconds = measure_rounds(programs, f.rounds)
  positions = f.length - 1
  table = summary(seconds, positions, f.reference or None)
  for name, row in table.items():
    ratio = row.get("median_ratio_vs_reference")
    logging.info("%-16s %9.1f us/token (rounds %.3f-%.3f s)%s", name, row["per_token_us"],
                 row["min_seconds"], row["max_seconds"],
                 f"  {f.reference} / this: {ratio:.2f}x" if ratio is not None else "")
  store = store_lib.Store(json_path)
  store.set("side_by_side", {
      "machine": machine.machine(), "model": work.describe(), "length": f.length,
      "batch": f.batch, "rounds": f.rounds, "reference": f.reference or None,
      "modal_order": f.modal_order, "configs": [c.name for c in configs],
      "compile_seconds": compile_seconds, "load_average_before": load,
      "load_average_after": machine.load_average(),
      "seconds": seconds, "summary": table})
  store_lib.write_csv(csv_path, [
      {"config": name, "round": r + 1, "seconds": s, "per_token_us": s / positions * 1e6}
      for name, runs in seconds.items() for r, s in enumerate(runs)])
  plot(seconds, positions, png_path, f"{work.kind} {f.width}/{f.layers}"
       f"{'/' + str(f.inner_width) if work.kind == 'lm' else ''}, L = {f.length}, batch "
       f"{f.batch}, {f.rounds} rounds side by side")
  logging.info("wrote %s, %s, %s", json_path, csv_path, png_path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
