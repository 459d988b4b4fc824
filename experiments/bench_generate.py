r"""Times every generation strategy against each other and against one offline forward.

  python -m experiments.bench_generate                       # small default: stack, L = 1024
  python -m experiments.bench_generate --model=stack --length=4096 --layers=8 --width=256
  python -m experiments.bench_generate --model=lm --length=4096 --layers=8 --width=256 \
      --inner_width=1024 --strategies=flash,lazy
  python -m experiments.bench_generate --model=lm --length=4096 --layers=8 --width=256 \
      --inner_width=1024 --strategies=flash --step_weights=float32,bfloat16

For each strategy: total time of generating positions 1 .. L-1 after a one-token prompt (median
of --repeats runs after a warm-up), time per token, compile time (apart), the filter-table time
(apart: once per model), XLA's memory analysis of the program and the process's peak RSS, the
ratio to lazy and to one offline parallel forward of the same length (also compiled apart).
Strategies too slow to run in full are measured on a sample and say so (`"method": "sampled"`
or `"extrapolated"`, see `lib.sampling.Sampling`): lazy above --sample_above (per-token cost
at --sample_positions prompt lengths, interpolated and summed), recompute above
--sample_recompute_above (one sample per power-of-two bucket), eager above --eager_max (fitted
on full runs at smaller L). Lazy's memory roofline (the bytes it must read over the measured
read bandwidth) is reported beside it.

Programs (`lib.workloads`): the stack in a `lcsm_jax.decoding.Rollout` (prefill of one position,
then `run(state, L - 1)`), the language model in a `lcsm_jax.Decoder` (prefill of one token,
then `score(state, ids[:, 1:])`); the offline forward is `ConvStack.forward` / `HyenaLM.apply`.

--step_weights (lm): the dtypes the step reads its dense kernels in (`lcsm_jax.Decoder(
step_weights=...)`), measured one after the other in the same run; a bfloat16 configuration's
key and results hold "step_weights": "bfloat16" (float32 keys are unchanged), and the log ends
with the float32 / bfloat16 time ratio of every strategy.

Writes --out (JSON): "points" (one per measured strategy/config; kept across runs, so a re-run
skips what is there) and "results" (per config: the table above, with ratios).
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.decoding import EngineOptions


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The runner's flags (defined by `__main__` only, so that importing this module for its
  functions defines no global flags that could clash with another runner's)."""
  fv = dict(flag_values=flag_values)
  flags_lib.define_model_flags(flag_values)
  flags_lib.define_sampling_flags(flag_values, recompute_above=256)
  flags.DEFINE_integer("length", 1024, "Sequence length L (prompt of 1, then L - 1 steps).",
                       **fv)
  flags.DEFINE_list("strategies", ["flash", "lazy", "eager", "recompute"], "Strategies to "
                    "time.", **fv)
  flags.DEFINE_list("bases", [str(EngineOptions().base)], "Flash tiling bases to time "
                    "(EngineOptions.base); the engine's default base is reported as 'flash', "
                    "base b as 'flash_b<b>'.", **fv)
  flags.DEFINE_list("step_weights", ["float32"], "lm: dtypes of the step's dense kernels "
                    "(float32, bfloat16), each measured in this run.", **fv)
  flags.register_validator(
      "step_weights", lambda v: bool(v) and set(v) <= {"float32", "bfloat16"},
      "step_weights must be a list of float32 and/or bfloat16.", **fv)
  flags.DEFINE_integer("bandwidth_megabytes", 256, "Array size of the read-bandwidth probe.",
                       **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "bench_generate.json",
                            "JSON output (points already in it are not measured again).")


def run_benchmark(model: str, length: int, layers: int, width: int, inner_width: int,
                  order: int, batch: int, strategies, tau, repeats: int, sample_above: int,
                  sample_points: int, sample_steps: int, sample_recompute_above: int = 256,
                  eager_max: int = 8192, recompute_sample_steps: int = 4, out=None,
                  bandwidth_megabytes: int = 256, bases=(EngineOptions().base,), *,
                  step_weights: str = "float32") -> dict:
  """Measures one configuration; returns its result table (and stores it in `out` if given).
  `step_weights` (keyword, lm): 'float32' or 'bfloat16', see `lcsm_jax.Decoder`.

  Returns:
    {"machine", "config", "offline_forward": {"seconds", "compile_seconds"},
     "read_bandwidth_bytes_per_second", "strategies": {name: measure_strategy's entry plus
     "speedup_vs_lazy" (lazy's time / this one's; when lazy was measured) and
     "vs_offline_forward" (this time / one forward); lazy also "mixing_roofline_seconds"}}.
  """
  work = workloads.Workload(model, layers, width, batch, inner_width, order, length,
                            step_weights=step_weights)
  sampling = sampling_lib.Sampling(lazy_above=sample_above,
                                   recompute_above=sample_recompute_above, eager_max=eager_max,
                                   positions=sample_points, steps=sample_steps,
                                   recompute_steps=recompute_sample_steps)
  store = store_lib.Store(out) if out else None
  config = dict(work.describe(), length=length, tau=tau, repeats=repeats)
  params = workloads.cached_params(work.replace(step_weights="float32"))
  options = EngineOptions(tau=tau)

  def point(key: dict, measure):
    return store_lib.point(store, key, measure)

  plain = {k: v for k, v in config.items() if k != "step_weights"}  # the float32 forward
  offline = point(dict(plain, what="offline_forward", tau=None),
                  lambda: sampling_lib.offline_forward(work, params, length, repeats))
  logging.info("offline forward over L=%d: %.1f ms", length, offline["seconds"] * 1e3)
  bandwidth = point({"what": "read_bandwidth", "megabytes": bandwidth_megabytes},
                    lambda: machine.read_bandwidth(bandwidth_megabytes))
  result = {"machine": machine.machine(), "config": dict(config, streams=work.streams),
            "offline_forward": offline, "read_bandwidth_bytes_per_second": bandwidth,
            "strategies": {}}
  default_base = EngineOptions().base
  runs = [(s, None) for s in strategies if s != "flash"]
  if "flash" in strategies:
    runs = [("flash", int(b)) for b in bases] + runs
  for strategy, base in runs:
    name = strategy if base in (None, default_base) else f"{strategy}_b{base}"
    # tau and base are flash's only; base 2 stays out of the key (the points measured before
    # bases existed are base 2)
    key = dict(config, what="generate", strategy=strategy,
               tau=tau if strategy == "flash" else None,
               **({"base": base} if base not in (None, 2) else {}),
               **sampling.key(strategy, length))
    run_options = EngineOptions.create(options, base=base or default_base)
    entry = dict(point(key, lambda s=strategy, o=run_options: sampling_lib.measure_strategy(
        work, params, s, length, o, repeats, sampling)))
    entry["vs_offline_forward"] = entry["total_seconds"] / offline["seconds"]
    result["strategies"][name] = entry
  if "lazy" in result["strategies"]:
    lazy = result["strategies"]["lazy"]
    lazy["mixing_roofline_seconds"] = workloads.lazy_bytes(
        length, work.streams, batch, width) / bandwidth
    for entry in result["strategies"].values():
      entry["speedup_vs_lazy"] = lazy["total_seconds"] / entry["total_seconds"]
  for name, entry in result["strategies"].items():
    logging.info("%-9s %9.3f s %9.1f us/token  x%.2f offline forward%s", name,
                 entry["total_seconds"], entry["per_token_seconds"] * 1e6,
                 entry["vs_offline_forward"],
                 f"  {entry['speedup_vs_lazy']:.1f}x faster than lazy"
                 if "speedup_vs_lazy" in entry else "")
  if store:
    results = store.data.setdefault("results", {})
    results[store_lib.key_of(**config)] = result
    store.save()
    logging.info("wrote %s", store.path)
  return result


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  if f.model != "lm" and f.step_weights != ["float32"]:
    raise app.UsageError("--step_weights applies to --model=lm only.")
  results = {}
  for dtype in f.step_weights:
    results[dtype] = _run(f, step_weights=dtype)
  if {"float32", "bfloat16"} <= set(results):
    for name, entry in results["bfloat16"]["strategies"].items():
      f32 = results["float32"]["strategies"][name]["per_token_seconds"]
      logging.info("%-9s float32 %.1f us/token, bfloat16 step weights %.1f us/token: x%.2f",
                   name, f32 * 1e6, entry["per_token_seconds"] * 1e6,
                   f32 / entry["per_token_seconds"])


def _run(f, step_weights: str) -> dict:
  return run_benchmark(
      f.model, f.length, f.layers, f.width, f.inner_width, f.order, f.batch, f.strategies,
      flags_lib.tau(f), f.repeats, f.sample_above, f.sample_positions, f.sample_steps,
      f.sample_recompute_above, f.eager_max, f.recompute_sample_steps, f.out,
      f.bandwidth_megabytes, f.bases, step_weights=step_weights)


if __name__ == "__main__":
  define_flags()
  app.run(main)
