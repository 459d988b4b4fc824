r"""One long flash generation (2^20 tokens at full size) and lazy projected to the same length.

  python -m experiments.long_run                     # small default: L = 8192
  python -m experiments.long_run --length=1048576    # the full run (see README: memory)

The model is the published HyenaDNA size --preset (default large-1m: d_model 256, 8 layers,
d_inner 1024) with random weights and l_max = --length, teacher forced over positions [1, L)
(`lcsm_jax.Decoder`: prefill of one token, then `score`). Before anything is allocated, XLA's
memory estimate of the run (`lib.workloads.Workload.estimate`: the session's
`estimate_memory`, compiled from shapes only) is checked against the memory available; if it
does not fit and --fallback is set, the next candidate is tried: the same model without
precomputed filter spectra (exact, slower FFT blocks), then the mixing-only stack of the same
layers and width (`lcsm_jax.decoding.Rollout`), then the stack at half the width, and so on.
Every attempt and its estimate are reported.

Then: a shorter flash run (--eta_length) to predict the long one's duration (logged, and kept
as a check on the L log^2 L scaling), the long run itself (--repeats runs after --warmup), and
lazy's per-token cost at --lazy_points prompt lengths up to --lazy_max_position, fitted by
a + b t (lazy reads the history of every earlier position, so its cost is linear in t) and
summed over [1, L): lazy's projected time. Lazy's memory roofline (bytes it must read over the
measured read bandwidth) is projected too.

Writes --out (JSON; a finished configuration is skipped on a re-run).
"""

from __future__ import annotations

import math
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments.lib import flags as flags_lib
from experiments.lib import machine
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.decoding import EngineOptions
from lcsm_jax.models.hyena import config as config_lib


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("model", "lm", ["lm", "stack"], "The language model or the mixing-only "
                    "stack (of the preset's layers and width).", **fv)
  flags.DEFINE_string("preset", "large-1m", "HyenaDNA size (lcsm_jax.PRESETS).", **fv)
  flags.DEFINE_integer("length", 8192, "Sequence length L (2^20 = 1048576 for the full run).",
                       **fv)
  flags.DEFINE_integer("batch", 1, "Batch rows.", **fv)
  flags_lib.define_tau_flag(flag_values)
  flags.DEFINE_bool("fallback", True, "Try smaller candidates when the run does not fit.", **fv)
  flags.DEFINE_float("memory_fraction", 0.85, "Fraction of available memory the run may use "
                     "by XLA's estimate.", **fv)
  flags.DEFINE_integer("repeats", 1, "Timed runs of the long generation.", **fv)
  flags.DEFINE_integer("warmup", 0, "Untimed runs before them (compilation is apart anyway).",
                       **fv)
  flags.DEFINE_integer("eta_length", 4096, "Length of the preliminary flash run (0: none).",
                       **fv)
  flags.DEFINE_integer("lazy_points", 3, "Prompt lengths at which lazy is sampled.", **fv)
  flags.DEFINE_integer("lazy_max_position", 65536, "Largest prompt length of a lazy sample.",
                       **fv)
  flags.DEFINE_integer("lazy_steps", 16, "Steps per lazy sample.", **fv)
  flags.DEFINE_integer("bandwidth_megabytes", 256, "Array size of the read-bandwidth probe.",
                       **fv)
  flags_lib.define_out_flag(flag_values, store_lib.RESULTS_DIR / "long_run.json",
                            "JSON output.")


def candidates(model: str, preset: str, length: int, batch: int, tau, fallback: bool):
  """[(workload, options)] in the order they are tried."""
  cfg = config_lib.preset(preset)
  base = workloads.Workload(model, cfg.n_layer, cfg.d_model, batch, cfg.d_inner, cfg.order,
                               length)
  out = [(base, EngineOptions(tau=tau))]
  if not fallback:
    return out
  out.append((base, EngineOptions(tau=tau, precomputed_spectra=False)))
  stack = base.replace(kind="stack")
  width = stack.width
  while width >= 16:
    out.append((stack.replace(width=width), EngineOptions(tau=tau)))
    width //= 2
  return out[:1] + [c for c in out[1:] if c != out[0]]


def describe(work: workloads.Workload, options: EngineOptions) -> dict:
  return dict(work.describe(), precomputed_spectra=options.precomputed_spectra)


def run_long(model: str, preset: str, length: int, batch: int, tau, fallback: bool,
             memory_fraction: float, repeats: int, warmup: int, eta_length: int,
             lazy_points: int, lazy_max_position: int, lazy_steps: int, out,
             bandwidth_megabytes: int = 256) -> dict:
  store = store_lib.Store(out)
  key = store_lib.key_of(what="long_run", model=model, preset=preset, length=length,
                            batch=batch, tau=tau, fallback=fallback, repeats=repeats,
                            lazy=[lazy_points, lazy_max_position, lazy_steps])
  return store.run(key, lambda: _measure(model, preset, length, batch, tau, fallback,
                                         memory_fraction, repeats, warmup, eta_length,
                                         lazy_points, lazy_max_position, lazy_steps,
                                         bandwidth_megabytes))


def _measure(model, preset, length, batch, tau, fallback, memory_fraction, repeats, warmup,
             eta_length, lazy_points, lazy_max_position, lazy_steps, bandwidth_megabytes):
  attempts, chosen = [], None
  for work, options in candidates(model, preset, length, batch, tau, fallback):
    estimate = work.estimate("flash", length, options)
    ok, why = machine.fits_in_memory(estimate["peak_bytes"], memory_fraction)
    attempts.append({"candidate": describe(work, options), "fits": ok, "reason": why,
                     "estimate": estimate})
    logging.info("%s: %s%s", describe(work, options), why, "" if ok else " -> does not fit")
    if ok:
      chosen = (work, options)
      break
  result = {"requested": {"model": model, "preset": preset, "length": length, "batch": batch,
                          "tau": tau}, "attempts": attempts}
  if chosen is None:
    result["skipped"] = "no candidate fits in the memory available"
    logging.warning(result["skipped"])
    return result
  work, options = chosen
  result["ran"] = describe(work, options)
  result["state_bytes_per_token"] = attempts[-1]["estimate"]["state_bytes_per_token"]
  params = work.params()

  if 1 < eta_length < length:
    short = sampling_lib.measure_strategy(work, params, "flash", eta_length, options, 1)
    growth = (math.log2(length) / math.log2(eta_length)) ** 2
    eta = short["per_token_seconds"] * (length - 1) * growth
    result["eta"] = {"length": eta_length, "per_token_seconds": short["per_token_seconds"],
                     "predicted_seconds": eta,
                     "model": "per-token time x (log2 L / log2 L_eta)^2"}
    logging.info("flash at L=%d: %.1f us/token; the run of L=%d should take ~%.0f s",
                 eta_length, short["per_token_seconds"] * 1e6, length, eta)

  start = time.perf_counter()
  flash = sampling_lib.measure_strategy(work, params, "flash", length, options, repeats,
                                        warmup=warmup)
  flash["tokens_per_second"] = (length - 1) / flash["total_seconds"]
  flash["wall_seconds_with_compile"] = time.perf_counter() - start
  result["flash"] = flash
  if "eta" in result:
    result["eta"]["actual_over_predicted"] = flash["total_seconds"] / result["eta"][
        "predicted_seconds"]

  # lazy: per-token cost at a few prompt lengths, linear in t, summed over [1, L)
  k = max(1, min(lazy_steps, length - 2))
  top = max(2, min(lazy_max_position, length - k))
  starts = sorted({int(t) for t in np.linspace(max(top // 8, 1), top, max(lazy_points, 2))})
  per_token, _ = sampling_lib.lazy_samples(work, params, starts, k, options, 1)
  centres = np.asarray(starts, float) + (k - 1) / 2
  b, a = np.polyfit(centres, per_token, 1) if len(starts) > 1 else (0.0, per_token[0])
  b = max(b, 0.0)
  positions = np.arange(1, length, dtype=float)
  projected = float(np.maximum(a + b * positions, 0).sum())
  bandwidth = machine.read_bandwidth(bandwidth_megabytes)
  roofline = workloads.lazy_bytes(length, work.streams, work.batch, work.width) / bandwidth
  result["lazy_projection"] = {
      "sample_positions": starts, "sample_steps": k, "sample_per_token_seconds": per_token,
      "fit": {"a_seconds": float(a), "b_seconds_per_position": float(b)},
      "projected_seconds": projected, "mixing_roofline_seconds": roofline,
      "read_bandwidth_bytes_per_second": bandwidth,
      "method": "per-token cost (T(t, k) - T(t, 0)) / k at the sample prompt lengths, fitted "
                "by a + b t and summed over positions 1 .. L-1"}
  result["projected_speedup_vs_lazy"] = projected / flash["total_seconds"]
  logging.info("flash %d tokens: %.1f s (%.0f tokens/s); lazy projected %.0f s (roofline "
               "%.0f s): %.1fx", length - 1, flash["total_seconds"],
               flash["tokens_per_second"], projected, roofline,
               result["projected_speedup_vs_lazy"])
  return result


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  run_long(f.model, f.preset, f.length, f.batch, flags_lib.tau(f), f.fallback,
           f.memory_fraction, f.repeats, f.warmup, f.eta_length, f.lazy_points,
           f.lazy_max_position, f.lazy_steps, f.out, f.bandwidth_megabytes)


if __name__ == "__main__":
  define_flags()
  app.run(main)
