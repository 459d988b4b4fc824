r"""Laughing Hyena distillation measured: Hankel spectra, tap error, model quality, agreement over
generated text, and the speed and memory of the modal strategy against exact generation.

  python -m experiments.distill                                   # small default (~2 min)
  python -m experiments.distill --parts=c,a,b,d,e --orders=2,4,8,16,32,64 \
      --quality_orders=2,4,8,16,32,64,96,128 --eval_windows=256 --gen_tokens=1000 \
      --stack_lengths=1024,4096,16384,65536,1048576 --lm_lengths=1024,4096,16384,65536 \
      --flash_max_length=65536 --lazy_max_length=65536        # the full run (~40 min)
  python -m experiments.distill --parts=e --stack_lengths= --lm_lengths=1048576 \
      --flash_max_length=1048576 --lazy_max_length=1048576    # the LM at 2^20 (~1 h)
  python -m experiments.distill --parts=e --stack_lengths=1048576 --lm_lengths= \
      --speed_strategies=flash --flash_max_length=1048576     # flash on the stack at 2^20

Parts (--parts, any subset, run in the order given):

(a) `hankel`: Hankel singular-value decay sigma_k / sigma_1, k = 1..--sv_count, of the shipped
    byte LM's trained filters (`lcsm_jax.load_byte_lm`) and of the same architecture's
    random-init filters (`init_params`, key 0); quantiles over channels, per layer
    (`lcsm_jax.distillation.hankel.hankel_singular_values` on the l_max taps).
(b) `taps`: `lcsm_jax.distill` of the shipped model at each of --orders, with and without
    --refine_steps of refinement: relative l2 tap error (p50 / p90 over channels), l1 of the tap
    error, max |pole|, distill time (the report's `overall` and `timings_s`).
(c) `quality`: the shipped model's held-out loss (nats/byte) and perplexity on the full
    held-out set (`lcsm_jax.training.corpus` rebuilt, `trainer.eval_windows`: --eval_windows
    windows of --seq_len + 1 bytes, the set of metrics.json's `heldout_loss`), exact (the
    parallel forward, as the trainer evaluated it, checked against metrics.json; and flash
    teacher forced) and modal per order of --quality_orders (teacher forced through
    `lcsm_jax.teacher_forced_logits(strategy='modal')`), each with and without refinement;
    the order-16 layer-by-layer split (one layer's filters distilled at a time); the smallest
    order within --within of exact; and the HyenaDNA fixture's modal-vs-exact logit error.
(d) `agreement`: --gen_tokens tokens generated from a held-out prompt by flash and by modal
    (order 16 and the smallest order within --within), same seed, greedy and temperature
    --temperature: first divergence, tokens equal, and KL(exact || modal) per step along the
    exact text (both teacher forced on it, distributions at the sampling temperature).
(e) `speed`: time per token of modal (order 16) vs flash vs lazy for the --stack_layers x
    --stack_width mixing-only stack (batch 1) and the random-init language model (--lm_width /
    --lm_layers / --lm_inner, HyenaDNA architecture as `lib.workloads`), each with its bare
    step (the same token loop with the long convolutions removed: the floor), at --stack_lengths /
    --lm_lengths; lazy sampled above --lazy_full_max (`lib.sampling`) and stopped above
    --lazy_max_length, flash stopped above --flash_max_length (from --long_length on: one
    timed run without warm-up, flash with base --long_flash_base, whose tables and state fit
    2^20 x 2048 channels in 24 GiB); and state bytes per sequence
    (the sessions' `state_shape`). The modal filters of these random models are random stable
    `ModalFilters` (poles |p| in [0.5, 0.99], uniform phase; quality is irrelevant for speed),
    on a filter length of 1024 (modal needs none: the session's max_length is L).

Timing as in every runner (`lib.sampling`): compilation apart, one warm-up, median of
--repeats runs, each ended by `jax.block_until_ready`; all strategies of a point measured side
by side in one process.

Writes --out (JSON: `machine`, `points` keyed by configuration, so a re-run skips what is
measured, and one summary per part with the targets), a CSV of the speed rows and PNG figures
beside it (`<out stem>_{hankel,taps,quality,agreement,speed}.png`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
import warnings
from typing import Any, Callable, ClassVar

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import lcsm_jax
from experiments.lib import flags as flags_lib
from experiments.lib import plots
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.decoding import Decoder, Engine, EngineOptions, Rollout
from lcsm_jax.decoding import memory as memory_lib
from lcsm_jax.decoding import strategies as strategies_lib
from lcsm_jax.decoding.strategies.base import MixingStrategy
from lcsm_jax.distillation import hankel as hankel_lib
from lcsm_jax.distillation.modal import ModalFilters
from lcsm_jax.models import online_model
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.training import corpus as corpus_lib
from lcsm_jax.training import trainer
from lcsm_jax.tuning.timing import CompileTimer, median_seconds

PARTS = ("a", "b", "c", "d", "e")
DEFAULT_OUT = store_lib.RESULTS_DIR / "distill" / "distill.json"
FIXTURE_DIR = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hyenadna_tiny"
TARGET_ORDER = 16
SPEED_FILTER_LENGTH = 1024  # the random models' filter length for modal and the bare step


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("parts", ["c", "a", "b", "d", "e"], "Parts to run, in this order: a "
                    "(Hankel decay), b (tap error), c (quality), d (agreement), e (speed).", **fv)
  flags.DEFINE_list("orders", ["2", "4", "8", "16"], "Orders N of part b.", **fv)
  flags.DEFINE_list("quality_orders", ["2", "4", "8", "16"], "Orders N of part c (the "
                    "smallest within --within is searched among them).", **fv)
  flags.DEFINE_integer("refine_steps", 100, "Refinement steps of the refined fits (b, c).", **fv)
  flags.DEFINE_integer("sv_count", 128, "Hankel singular values per filter in part a.", **fv)
  flags.DEFINE_integer("eval_windows", 32, "Held-out windows (metrics.json: 256, the full "
                       "65,536-byte set).", **fv)
  flags.DEFINE_integer("seq_len", 256, "Held-out window length (metrics.json: 256).", **fv)
  flags.DEFINE_integer("eval_batch", 64, "Windows per teacher-forced call.", **fv)
  flags.DEFINE_float("within", 1e-3, "The perplexity tolerance of the smallest order searched "
                     "(relative, 1e-3 = 0.1%).", **fv)
  flags.DEFINE_string("fixture_dir", str(FIXTURE_DIR), "The HyenaDNA tiny fixture ('' to skip "
                      "its logit error).", **fv)
  flags.DEFINE_list("fixture_orders", ["2", "4", "8", "16", "32", "64"], "Orders of the "
                    "fixture's logit error.", **fv)
  flags.DEFINE_integer("gen_tokens", 200, "Tokens generated in part d.", **fv)
  flags.DEFINE_integer("prompt_length", 24, "Held-out prompt bytes in part d.", **fv)
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature of part d (besides greedy).",
                     **fv)
  flags.DEFINE_integer("seed", 0, "PRNG seed of part d.", **fv)
  flags.DEFINE_integer("stack_layers", 8, "Layers of the stack (e).", **fv)
  flags.DEFINE_integer("stack_width", 256, "Channels of the stack (e).", **fv)
  flags.DEFINE_integer("lm_layers", 8, "Layers of the random LM (e).", **fv)
  flags.DEFINE_integer("lm_width", 256, "d_model of the random LM (e).", **fv)
  flags.DEFINE_integer("lm_inner", 1024, "d_inner of the random LM (e).", **fv)
  flags.DEFINE_integer("speed_order", TARGET_ORDER, "Modal order N timed in part e.", **fv)
  flags.DEFINE_list("stack_lengths", ["1024", "4096"], "Lengths L of the stack (e).", **fv)
  flags.DEFINE_list("lm_lengths", ["1024", "4096"], "Lengths L of the LM (e).", **fv)
  flags.DEFINE_list("speed_strategies", ["modal", "bare", "flash", "lazy"], "Strategies of "
                    "part e ('bare': the same step without long convolutions).", **fv)
  flags.DEFINE_integer("flash_max_length", 65536, "Flash is not run above this L.", **fv)
  flags.DEFINE_integer("lazy_max_length", 65536, "Lazy is not run above this L.", **fv)
  flags.DEFINE_integer("lazy_full_max", 4096, "Lazy is sampled (lib.sampling) above this L.",
                       **fv)
  flags.DEFINE_integer("sample_positions", 4, "Prompt lengths at which lazy is sampled.", **fv)
  flags.DEFINE_integer("sample_steps", 64, "Steps per lazy sample.", **fv)
  flags_lib.define_tau_flag(flag_values)
  flags.DEFINE_integer("repeats", 3, "Timed runs (median) after one warm-up.", **fv)
  flags.DEFINE_integer("long_length", 1 << 20, "From this L on, part e times --long_repeats "
                       "runs without a warm-up (a run takes minutes) and flash uses "
                       "--long_flash_base.", **fv)
  flags.DEFINE_integer("long_repeats", 1, "Timed runs at L >= --long_length.", **fv)
  flags.DEFINE_integer("flash_base", 4, "Flash's tiling base in part e below --long_length.",
                       **fv)
  flags.DEFINE_integer("long_flash_base", 2, "Flash's tiling base at L >= --long_length (base "
                       "4 keeps every level's spectra and input-block spectra: 19 bytes per "
                       "position and channel against base 2's 8.5, too much for 2^20 x 2048 "
                       "channels in 24 GiB).", **fv)
  flags_lib.define_out_flag(flag_values, DEFAULT_OUT)


# -- pure helpers -------------------------------------------------------------------------------

def quantiles(x, axis=None, qs=(0.1, 0.5, 0.9)) -> dict[str, Any]:
  """{'p10', 'p50', 'p90'} (or the given quantiles) of x along `axis`, as floats or lists."""
  out = {}
  for q in qs:
    v = np.quantile(np.asarray(x, np.float64), q, axis=axis)
    out[f"p{int(round(q * 100))}"] = v.tolist() if np.ndim(v) else float(v)
  return out


def perplexity(loss: float) -> float:
  return float(math.exp(loss))


def relative_change(value: float, reference: float) -> float:
  """value / reference - 1."""
  return float(value / reference - 1.0)


def smallest_within(rows: list[dict[str, Any]], within: float, key: str = "ppl_rel_change"
                    ) -> int | None:
  """The smallest `order` of `rows` whose |row[key]| <= within (None if none)."""
  ok = [r["order"] for r in rows if abs(r[key]) <= within]
  return min(ok) if ok else None


def first_divergence(a, b) -> int | None:
  """The first index where token sequences a and b differ (None if they never do)."""
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  diff = np.flatnonzero(a[:min(a.size, b.size)] != b[:min(a.size, b.size)])
  return int(diff[0]) if diff.size else None


def kl_per_step(p_logits, q_logits, temperature: float = 1.0) -> np.ndarray:
  """KL(p || q) (nats) per row of logits (..., V), both at `temperature` (float64)."""
  t = 1.0 if temperature == 0 else temperature
  p = np.asarray(p_logits, np.float64) / t
  q = np.asarray(q_logits, np.float64) / t
  lp = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
  lq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
  return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def random_modal_filters(streams: int, width: int, order: int, seed: int = 0) -> ModalFilters:
  """Random stable modal filters (S, D, N/2): |p| uniform in [0.5, 0.99], uniform phase,
  residues N(0, 1) sqrt(2 / N) (the savanna LaughingHyenaModalFilter's initialisation), h0 0."""
  rng = np.random.default_rng(seed)
  shape = (streams, width, order // 2)
  poles = rng.uniform(0.5, 0.99, shape) * np.exp(1j * rng.uniform(0, np.pi, shape))
  residues = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * np.sqrt(1 / order)
  return ModalFilters(jnp.asarray(poles, jnp.complex64), jnp.asarray(residues, jnp.complex64),
                      jnp.zeros((streams, width), jnp.float32))


# -- models and held-out data -------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def byte_lm():
  """(config, params, metrics) of the shipped model."""
  return lcsm_jax.load_byte_lm()


def heldout_windows(num_windows: int, seq_len: int) -> np.ndarray:
  """The held-out evaluation windows (num_windows, seq_len + 1) int32, built as
  `experiments/train_lm.py` built them (corpus rebuilt from this Python's standard library)."""
  data = corpus_lib.build_corpus()
  return trainer.eval_windows(data.validation, seq_len, num_windows)


@functools.lru_cache(maxsize=4)
def _forward_nll(config):
  model = HyenaLM(config)
  return jax.jit(lambda params, x, taps: trainer.token_nll(
      model.apply(params, x[:, :-1], taps=taps), x[:, 1:], config.vocab_size).sum())


def parallel_loss(params, config, windows: np.ndarray, batch: int = 16, taps=None) -> float:
  """Mean next-token nll (nats) of windows (N, L + 1) by the parallel forward (the trainer's
  evaluation: batches of `batch`, float32 sums), with the model's filters or `taps`."""
  fn = _forward_nll(config)
  total = 0.0
  for s in range(0, len(windows), batch):
    total += float(fn(params, jnp.asarray(windows[s:s + batch]), taps))
  return total / (windows.shape[0] * (windows.shape[1] - 1))


def teacher_forced_loss(params, config, windows: np.ndarray, strategy: str,
                        distilled=None, batch: int = 64,
                        options: EngineOptions | None = None) -> float:
  """Mean next-token nll (nats) of windows (N, L + 1), every position fed one at a time through
  `lcsm_jax.teacher_forced_logits(strategy=...)` (prompt_length 0)."""
  total = 0.0
  for s in range(0, len(windows), batch):
    chunk = windows[s:s + batch]
    logits = lcsm_jax.teacher_forced_logits(params, config, chunk[:, :-1], strategy=strategy,
                                            distilled=distilled, options=options)
    total += float(trainer.token_nll(logits, jnp.asarray(chunk[:, 1:]),
                                     config.vocab_size).sum())
  return total / (windows.shape[0] * (windows.shape[1] - 1))


class Distillations:
  """`lcsm_jax.distill` of one model, kept per (order, refine_steps), with its wall time."""

  def __init__(self, params, config):
    self.params, self.config = params, config
    self._done: dict[tuple[int, int], tuple[Any, float]] = {}

  def get(self, order: int, refine_steps: int = 0):
    key = (order, refine_steps)
    if key not in self._done:
      start = time.perf_counter()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # large tap errors are expected and reported
        distilled = lcsm_jax.distill(self.params, self.config, order=order,
                                     refine_steps=refine_steps)
      self._done[key] = (distilled, time.perf_counter() - start)
      logging.info("distilled order %d, refine %d: %.1f s, rel l2 p50 %.3f", order,
                   refine_steps, self._done[key][1],
                   distilled.report["overall"]["rel_l2"]["p50"])
    return self._done[key]


# -- (a) Hankel singular-value decay -------------------------------------------------------------

def hankel_decay(params, config, count: int) -> dict[str, Any]:
  """sigma_k / sigma_1, k = 1..count, quantiles over channels per layer."""
  taps, _ = online_model(config).filters(params, config.l_max)
  sv = hankel_lib.hankel_singular_values(np.asarray(taps, np.float32))  # (S, D, k)
  ratio = sv[..., :count] / np.maximum(sv[..., :1], np.finfo(np.float64).tiny)
  per_layer = config.num_streams // config.n_layer
  layers = []
  for layer in range(config.n_layer):
    r = ratio[layer * per_layer:(layer + 1) * per_layer].reshape(-1, ratio.shape[-1])
    layers.append({"layer": layer, **quantiles(r, axis=0),
                   "k_below_1e-2_p50": int(np.argmax(np.median(r, 0) < 1e-2)) + 1
                   if (np.median(r, 0) < 1e-2).any() else None})
  flat = ratio.reshape(-1, ratio.shape[-1])
  return {"k": list(range(1, ratio.shape[-1] + 1)), "per_layer": layers,
          "overall": quantiles(flat, axis=0),
          "ratio_at": {str(k): quantiles(flat[:, k - 1]) for k in (2, 4, 8, 16, 32, 64, 128)
                       if k <= flat.shape[1]}}


def run_hankel(store, count: int) -> dict[str, Any]:
  config, params, _ = byte_lm()
  trained = store.run(store_lib.key_of(part="a", model="byte_lm", count=count),
                      lambda: hankel_decay(params, config, count))
  random = store.run(store_lib.key_of(part="a", model="byte_lm_random_init", count=count),
                     lambda: hankel_decay(lcsm_jax.init_params(config, jax.random.key(0)),
                                          config, count))
  return {"trained": trained, "random_init": random}


# -- (b) tap error vs order ----------------------------------------------------------------------

def tap_error(distilled, seconds: float) -> dict[str, Any]:
  overall = distilled.report["overall"]
  return {"rel_l2_p50": overall["rel_l2"]["p50"], "rel_l2_p90": overall["rel_l2"]["p90"],
          "l1_p50": overall["l1"]["p50"], "l1_p90": overall["l1"]["p90"],
          "max_pole": overall["max_pole"]["max"],
          "hankel_ratio_p50": overall["hankel_ratio"]["p50"],
          "rel_l2_p50_per_layer": [r["rel_l2"]["p50"] for r in distilled.report["per_stream"]],
          "distill_seconds": seconds, "timings_s": distilled.report["timings_s"]}


def run_taps(store, dist: Distillations, orders, refine_steps: int) -> list[dict[str, Any]]:
  rows = []
  for refine in dict.fromkeys([0, refine_steps]):
    for order in orders:
      value = store.run(store_lib.key_of(part="b", order=order, refine_steps=refine),
                        lambda o=order, r=refine: tap_error(*dist.get(o, r)))
      rows.append(dict(order=order, refine_steps=refine, **value))
  return rows


# -- (c) quality --------------------------------------------------------------------------------

def fixture_logit_error(fixture_dir: str, orders) -> list[dict[str, Any]]:
  """The HyenaDNA fixture distilled per order: modal teacher-forced logits vs the exact
  parallel forward on its `forward_input_ids` (real vocabulary)."""
  config, params = lcsm_jax.load_hyenadna(fixture_dir)
  with np.load(pathlib.Path(fixture_dir) / "reference.npz") as ref:
    ids = ref["forward_input_ids"]
  exact = np.asarray(HyenaLM(config).apply(params, jnp.asarray(ids)))[..., :config.vocab_size]
  rows = []
  for order in orders:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      distilled = lcsm_jax.distill(params, config, order=order)
    modal = np.asarray(lcsm_jax.teacher_forced_logits(params, config, ids, strategy="modal",
                                                      distilled=distilled))
    err = np.abs(modal[..., :config.vocab_size] - exact)
    rows.append({"order": order, "max_abs": float(err.max()),
                 "max_abs_relative": float(err.max() / np.abs(exact).max()),
                 "rel_l2": float(np.linalg.norm(err) / np.linalg.norm(exact)),
                 "argmax_agreement": float(np.mean(modal[..., :config.vocab_size].argmax(-1)
                                                   == exact.argmax(-1))),
                 "tap_rel_l2_p50": distilled.report["overall"]["rel_l2"]["p50"]})
    logging.info("fixture order %d: max |logit error| %.3g (relative %.3g)", order,
                 rows[-1]["max_abs"], rows[-1]["max_abs_relative"])
  return rows


def layer_split(params, config, windows, distilled) -> list[dict[str, Any]]:
  """The held-out loss with one layer's filters distilled at a time (the others exact): the
  parallel forward with mixed taps (equal to modal teacher forcing to float32 accuracy)."""
  length = windows.shape[1] - 1
  exact_taps, _ = online_model(config).filters(params, length)
  modal_taps = distilled.filters.taps(length)
  per_layer = config.num_streams // config.n_layer
  rows = []
  for layer in range(config.n_layer):
    sel = slice(layer * per_layer, (layer + 1) * per_layer)
    taps = exact_taps.at[:, sel].set(modal_taps[:, sel])
    rows.append({"layer": layer, "loss": parallel_loss(params, config, windows, 32, taps)})
  return rows


def run_quality(store, dist: Distillations, orders, refine_steps: int, windows: np.ndarray,
                batch: int, within: float, fixture_dir: str, fixture_orders,
                options: EngineOptions) -> dict[str, Any]:
  config, params, metrics = dist.config, dist.params, byte_lm()[2]
  base = dict(part="c", windows=int(windows.shape[0]), seq_len=int(windows.shape[1] - 1))
  exact = store.run(store_lib.key_of(**base, what="exact"), lambda: {
      "parallel_loss": parallel_loss(params, config, windows),
      "flash_teacher_forced_loss": teacher_forced_loss(params, config, windows, "flash",
                                                       batch=batch, options=options)})
  loss = exact["parallel_loss"]
  full_set = windows.shape == (metrics["heldout_eval_windows"],
                               metrics["train_config"]["seq_len"] + 1)
  check = {"metrics_json_heldout_loss": metrics["heldout_loss"], "full_heldout_set": full_set,
           "abs_difference": abs(loss - metrics["heldout_loss"]),
           "matches": bool(full_set and abs(loss - metrics["heldout_loss"]) < 1e-6)}
  rows = []
  for refine in dict.fromkeys([0, refine_steps]):
    for order in orders:
      def measure(o=order, r=refine):
        distilled, seconds = dist.get(o, r)
        modal = teacher_forced_loss(params, config, windows, "modal", distilled, batch)
        return {"loss": modal, "distill_seconds": seconds,
                "tap_rel_l2_p50": distilled.report["overall"]["rel_l2"]["p50"]}
      value = store.run(store_lib.key_of(**base, what="modal", order=order, refine_steps=refine),
                        measure)
      rows.append(dict(order=order, refine_steps=refine, **value, ppl=perplexity(value["loss"]),
                       ppl_rel_change=relative_change(perplexity(value["loss"]),
                                                      perplexity(loss))))
      logging.info("order %d refine %d: loss %.5f ppl %.4f (%+.3f%% vs exact)", order, refine,
                   value["loss"], rows[-1]["ppl"], 100 * rows[-1]["ppl_rel_change"])
  plain = [r for r in rows if r["refine_steps"] == 0]
  smallest = smallest_within(plain, within)
  smallest_refined = smallest_within([r for r in rows if r["refine_steps"] == refine_steps],
                                     within) if refine_steps else None
  layers = None
  if TARGET_ORDER in orders:
    layers = store.run(store_lib.key_of(**base, what="layer_split", order=TARGET_ORDER),
                       lambda: layer_split(params, config, windows, dist.get(TARGET_ORDER)[0]))
    for row in layers:
      row["ppl_rel_change"] = relative_change(perplexity(row["loss"]), perplexity(loss))
  fixture = None
  if fixture_dir:
    fixture = store.run(store_lib.key_of(part="c", what="fixture", orders=list(fixture_orders)),
                        lambda: fixture_logit_error(fixture_dir, fixture_orders))
  target = next((r for r in plain if r["order"] == TARGET_ORDER), None)
  return {
      "exact": dict(exact, loss=loss, ppl=perplexity(loss),
                    flash_vs_parallel=exact["flash_teacher_forced_loss"] - loss),
      "metrics_json_check": check, "windows": int(windows.shape[0]),
      "tokens": int(windows[:, 1:].size), "rows": rows, "layer_split_order_16": layers,
      "fixture": fixture, "within": within, "smallest_order_within": smallest,
      "smallest_order_within_refined": smallest_refined,
      "targets": {
          "order16_ppl_rel_change": target["ppl_rel_change"] if target else None,
          "order16_within_1pct": bool(target and abs(target["ppl_rel_change"]) <= 0.01),
          "smallest_order_within_0.1pct": smallest,
      }}


# -- (d) agreement ------------------------------------------------------------------------------

def agreement(params, config, prompt: np.ndarray, num_tokens: int, temperature: float,
              seed: int, distilled_by_order: dict[int, Any]) -> dict[str, Any]:
  """Tokens of flash and of modal per order (same key), the first divergence, and KL(exact ||
  modal) per step along the exact text (both teacher forced on prompt + exact tokens)."""
  key = None if temperature == 0 else jax.random.key(seed)
  prompt = np.asarray(prompt, np.int32)[None]
  exact = np.asarray(lcsm_jax.generate(params, config, prompt, num_tokens, key,
                                       temperature=temperature).tokens)[0]
  text = np.concatenate([prompt[0], exact[:-1]])[None]
  p = prompt.shape[1]
  vocab = config.vocab_size
  exact_logits = np.asarray(lcsm_jax.teacher_forced_logits(params, config, text))[0, p - 1:,
                                                                                   :vocab]
  out = {"temperature": temperature, "prompt_length": p, "tokens": num_tokens, "orders": {}}
  for order, distilled in distilled_by_order.items():
    modal = np.asarray(lcsm_jax.generate(params, config, prompt, num_tokens, key,
                                         temperature=temperature, strategy="modal",
                                         distilled=distilled).tokens)[0]
    modal_logits = np.asarray(lcsm_jax.teacher_forced_logits(
        params, config, text, strategy="modal", distilled=distilled))[0, p - 1:, :vocab]
    kl = kl_per_step(exact_logits, modal_logits, temperature)
    out["orders"][str(order)] = {
        "first_divergence": first_divergence(exact, modal),
        "equal_tokens": int(np.sum(exact == modal)), "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()), "kl_per_step": kl.tolist()}
    logging.info("T=%g order %d: first divergence %s, mean KL %.3g", temperature, order,
                 out["orders"][str(order)]["first_divergence"], kl.mean())
  return out


def run_agreement(store, dist: Distillations, orders, num_tokens: int, prompt_length: int,
                  temperature: float, seed: int, prompt: np.ndarray) -> list[dict[str, Any]]:
  results = []
  for temp in (0.0, temperature):
    key = store_lib.key_of(part="d", tokens=num_tokens, prompt_length=prompt_length,
                           temperature=temp, seed=seed, orders=list(orders))
    results.append(store.run(key, lambda t=temp: agreement(
        dist.params, dist.config, prompt[:prompt_length], num_tokens, t, seed,
        {o: dist.get(o)[0] for o in orders})))
  return results


# -- (e) speed and memory -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NoMixing(MixingStrategy):
  """The bare step: the same token loop with the long convolutions removed (pending outputs
  zero, no state), the floor of any mixing strategy. Not registered in the library."""

  name: ClassVar[str] = "bare"
  exact: ClassVar[bool] = False
  needs_taps: ClassVar[bool] = False
  unbounded: ClassVar[bool] = True

  def prepare(self, taps, aux=None):
    return ()

  def init(self, tables, prompt, prefill, num_steps):
    shape = prefill.conv_inputs.shape[1:]
    return jnp.zeros(shape, jnp.float32)  # (S, B, D): the (zero) pending outputs

  def pending(self, tables, state, r):
    return state

  def table_layout(self, tables):  # layouts on a device mesh: unused on one device
    return None

  def state_layout(self, state):
    return None

  def update(self, tables, state, r, inputs, num_steps):
    return state


def _bare_prefill(params, tables, prompt, *, engine):
  outputs, state = engine.prefill(params, tables, prompt)
  return state, outputs[:, -1].astype(jnp.float32)


def _bare_run(params, tables, state, last, *, engine, num_steps):
  batch, width = last.shape
  outputs = jnp.zeros((batch, num_steps, width), jnp.float32)

  def emit(io, r, out):
    out = out.astype(jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(io[0], out, r, axis=1), out

  state, (outputs, last) = engine.run(params, tables, state, num_steps, (outputs, last),
                                      lambda io, r: io[1], emit)
  return outputs, state, last


def speed_workload(kind: str, layers: int, width: int, inner: int, length: int):
  return workloads.Workload(kind, layers, width, 1, inner, 2, length)


def modal_session(work: workloads.Workload, params, length: int, distilled,
                  donate_state: bool = True):
  """The modal Rollout / Decoder of `work` (filter length `work.max_length`) for L = length."""
  options = EngineOptions(check_memory=False)
  if work.kind == "stack":
    return Rollout(params, work.stack(), "modal", max_length=length, options=options,
                   distilled=distilled, donate_state=donate_state)
  return Decoder(params, work.config(), "modal", max_length=length, options=options,
                 distilled=distilled, check_finite=False, donate_state=donate_state)


def modal_program(work: workloads.Workload, params, length: int, distilled
                  ) -> workloads.Program:
  """As `Workload.program` (compile apart, tables apart), for modal with `distilled`."""
  session = modal_session(work, params, length, distilled)
  session.engine(work.batch)
  workloads.fresh_compilation()
  with CompileTimer() as tables_timer:
    session.table_parts()
  with CompileTimer() as timer:
    parts = work.estimate_memory(session, 1, length - 1)
  start = time.perf_counter()
  jax.block_until_ready(session.tables)
  prepare = time.perf_counter() - start
  if work.kind == "stack":
    head = jnp.asarray(work.inputs(1))
    prefill = lambda: session.prefill(head)[1]
    run = lambda: session.run(prefill(), length - 1)
  else:
    ids = work.inputs(length)
    prefill = lambda: session.prefill(ids[:, :1])
    run = lambda: session.score(prefill(), ids[:, 1:])
  return workloads.Program(run, prefill, timer.seconds, tables_timer.seconds, prepare,
                           workloads.memory_parts(parts))


def _bare_score(params, tables, state, token_ids, *, engine):
  batch, n = token_ids.shape
  logits = jnp.zeros((batch, n, engine.model.config.padded_vocab_size), jnp.float32)

  def emit(io, r, out):
    out = out.astype(jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(io[0], out, r, axis=1), out

  feed = lambda io, r: jax.lax.dynamic_index_in_dim(token_ids, r, axis=1, keepdims=False)
  state, (logits, _) = engine.run(params, tables, state, n, (logits, logits[:, 0]), feed, emit)
  return logits, state


def bare_program(work: workloads.Workload, params, length: int) -> workloads.Program:
  """The bare step (`NoMixing` in a `lcsm_jax.decoding.Engine`), run as the sessions run: a
  prefill of one position, then L - 1 positions (the stack feeding each output back, the
  language model teacher forced on the workload's ids)."""
  model = work.stack() if work.kind == "stack" else online_model(work.config())
  engine = Engine(model, NoMixing(), length)
  tables = jax.jit(engine.prepare)(params)
  if work.kind == "stack":
    head = jnp.asarray(work.inputs(1))
    prefill_fn = jax.jit(functools.partial(_bare_prefill, engine=engine))
    run_fn = jax.jit(functools.partial(_bare_run, engine=engine, num_steps=length - 1),
                     donate_argnums=(2,))
    with CompileTimer() as timer:
      prefill_c = prefill_fn.lower(params, tables, head).compile()
      state, last = jax.eval_shape(prefill_fn, params, tables, head)
      run_c = run_fn.lower(params, tables, state, last).compile()
    prefill = lambda: prefill_c(params, tables, head)
    run = lambda: run_c(params, tables, *prefill())
    return workloads.Program(run, prefill, timer.seconds, 0.0, 0.0, {})
  ids = jnp.asarray(work.inputs(length))
  prefill_fn = jax.jit(lambda p, t, x: engine.prefill(p, t, x)[1])
  score_fn = jax.jit(functools.partial(_bare_score, engine=engine), donate_argnums=(2,))
  with CompileTimer() as timer:
    prefill_c = prefill_fn.lower(params, tables, ids[:, :1]).compile()
    state = jax.eval_shape(prefill_fn, params, tables, ids[:, :1])
    score_c = score_fn.lower(params, tables, state, ids[:, 1:]).compile()
  prefill = lambda: prefill_c(params, tables, ids[:, :1])
  run = lambda: score_c(params, tables, prefill(), ids[:, 1:])
  return workloads.Program(run, prefill, timer.seconds, 0.0, 0.0, {})


def time_program(program: workloads.Program, length: int, repeats: int, warmup: int = 1
                 ) -> dict[str, Any]:
  seconds, runs = median_seconds(program.run, repeats, warmup)
  return {"total_seconds": seconds, "runs_seconds": runs, "method": "full",
          "per_token_seconds": seconds / (length - 1), "compile_seconds": program.compile_seconds,
          "prepare_seconds": program.prepare_seconds, "xla_memory": program.memory}


def state_bytes(work: workloads.Workload, strategy: str, length: int, distilled=None,
                options: EngineOptions | None = None) -> int:
  """Bytes of the strategy's state per sequence after a one-position prompt (`state_shape` of a
  session made from the parameters' shapes: nothing allocated or compiled)."""
  found = {}

  def build(params):
    if strategy == "modal":
      session = modal_session(work, params, length, distilled, donate_state=False)
    else:
      session = work.replace(max_length=length).session(params, strategy, length,
                                                         options or EngineOptions())
    found["bytes"] = memory_lib.tree_bytes(session.state_shape(work.batch, 1).engine.strategy)
    return ()

  jax.eval_shape(build, work.abstract_params())
  return int(found["bytes"])


@dataclasses.dataclass(frozen=True)
class LongRuns:
  """How part e times the lengths from `length` on: `repeats` runs, no warm-up, flash with
  tiling base `flash_base` (below: the caller's repeats, one warm-up, `short_flash_base`)."""
  length: int = 1 << 20
  repeats: int = 1
  flash_base: int = 2
  short_flash_base: int = EngineOptions.base

  def settings(self, length: int, repeats: int) -> tuple[int, int, int]:
    """(timed runs, warm-up runs, flash base) at L = length."""
    if length >= self.length:
      return self.repeats, 0, self.flash_base
    return repeats, 1, self.short_flash_base


def run_speed(store, kind: str, layers: int, width: int, inner: int, lengths, strategies,
              order: int, repeats: int, tau, flash_max: int, lazy_max: int, lazy_full_max: int,
              sampling: sampling_lib.Sampling, long: LongRuns | None = None
              ) -> list[dict[str, Any]]:
  """Per-token time and state bytes of every strategy at every L (rows for the CSV)."""
  long = long or LongRuns()
  rows = []
  base_work = speed_workload(kind, layers, width, inner, SPEED_FILTER_LENGTH)
  small_params = workloads.cached_params(base_work)
  distilled = random_modal_filters(base_work.streams, width, order)
  for length in lengths:
    for strategy in strategies:
      if (strategy == "flash" and length > flash_max) or (strategy == "lazy" and
                                                          length > lazy_max):
        logging.info("%s %s at L=%d: not run (above its --%s_max_length)", kind, strategy,
                     length, strategy)
        continue
      runs, warmup, base = long.settings(length, repeats)
      config = dict(base_work.describe(), part="e", strategy=strategy, length=length,
                    repeats=runs)
      if not warmup:
        config["warmup"] = 0
      if strategy == "modal":
        config["order"] = order
      if strategy == "flash":
        config["tau"] = tau
        if base != EngineOptions.base:
          config["base"] = base
      if strategy == "lazy":
        config.update(sampling.key("lazy", length))

      def measure(strategy=strategy, length=length, runs=runs, warmup=warmup, base=base):
        if strategy == "modal":
          entry = time_program(modal_program(base_work, small_params, length, distilled),
                               length, runs, warmup)
          entry["state_bytes"] = state_bytes(base_work, "modal", length, distilled)
        elif strategy == "bare":
          entry = time_program(bare_program(base_work, small_params, length), length, runs,
                               warmup)
          entry["state_bytes"] = 0
        else:
          work = base_work.replace(max_length=length)
          # the stack's parameters are its taps: made for the session alone, which releases
          # them once the tables of a strategy that `supplies_filters` (flash, lazy) hold
          # them (at 2^20, 8 GiB that would not fit beside them)
          supplies = strategies_lib.strategy_class(strategy).supplies_filters
          params = (work.params if work.kind == "stack" and supplies
                    else workloads.cached_params(work))
          options = (EngineOptions(tau=tau, base=base) if strategy == "flash"
                     else EngineOptions())
          entry = sampling_lib.measure_strategy(work, params, strategy, length, options,
                                                runs, sampling, warmup)
          entry["state_bytes"] = state_bytes(work, strategy, length, options=options)
        logging.info("%s %s L=%d: %.1f us/token (%s), state %.1f KiB", kind, strategy, length,
                     entry["per_token_seconds"] * 1e6, entry["method"],
                     entry["state_bytes"] / 1024)
        return entry

      entry = store.run(store_lib.key_of(**config), measure)
      rows.append(speed_row(kind, strategy, length, entry))
  return rows


def speed_row(kind: str, strategy: str, length: int, entry: dict[str, Any]) -> dict[str, Any]:
  """One row of the speed summary (and CSV) from a stored part-e point."""
  return {"model": kind, "strategy": strategy, "length": length,
          "per_token_seconds": entry["per_token_seconds"],
          "total_seconds": entry["total_seconds"], "method": entry["method"],
          "compile_seconds": entry["compile_seconds"], "state_bytes": entry["state_bytes"],
          "state_bytes_per_token": entry["state_bytes"] / length}


def stored_speed_rows(store, workloads_by_kind: dict[str, workloads.Workload], order: int,
                      measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The speed summary's rows: every part-e point in the store for these workloads (modal at
  `order`), one per (model, strategy, length), the one stored last where several are (other
  repeats or sampling), and the rows `measured` in this run over any of them; sorted. So a run
  at a few lengths updates the summary instead of replacing it."""
  best: dict[tuple, dict[str, Any]] = {}
  for key, entry in store.points.items():
    config = json.loads(key)
    work = workloads_by_kind.get(config.get("model"))
    if config.get("part") != "e" or work is None or "per_token_seconds" not in entry:
      continue
    strategy = config["strategy"]
    described = work.describe()
    same = all(config.get(k) == v for k, v in described.items() if k != "order")
    if not same or config.get("order") != (order if strategy == "modal"
                                           else described.get("order")):
      continue
    best[(config["model"], strategy, config["length"])] = speed_row(
        config["model"], strategy, config["length"], entry)
  for row in measured:
    best[(row["model"], row["strategy"], row["length"])] = row
  return [best[k] for k in sorted(best)]


def speed_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The issue's speed targets, each {'ratio', 'met'} (None where not measured)."""
  def t(model, strategy, length):
    for r in rows:
      if (r["model"], r["strategy"], r["length"]) == (model, strategy, length):
        return r["per_token_seconds"]
    return None

  def target(num, den, limit, at_most=True):
    if num is None or den is None:
      return {"ratio": None, "met": None}
    ratio = num / den
    return {"ratio": ratio, "met": bool(ratio <= limit if at_most else ratio >= limit)}

  stack_lengths = sorted({r["length"] for r in rows if r["model"] == "stack"})
  longest = max(stack_lengths) if stack_lengths else None
  out = {
      "stack_modal_longest_vs_1k": dict(target(t("stack", "modal", longest),
                                               t("stack", "modal", 1024), 1.3),
                                        longest=longest, limit=1.3,
                                        asked_at=1 << 20, measured_at_asked=longest == 1 << 20),
      "stack_modal_vs_bare": {}, "stack_modal_speedup_vs_flash_16k": dict(
          target(t("stack", "flash", 16384), t("stack", "modal", 16384), 3.0, False), limit=3.0),
      "lm_modal_speedup_vs_flash_16k": dict(
          target(t("lm", "flash", 16384), t("lm", "modal", 16384), 1.3, False), limit=1.3),
  }
  for length in stack_lengths:
    out["stack_modal_vs_bare"][str(length)] = dict(
        target(t("stack", "modal", length), t("stack", "bare", length), 1.5), limit=1.5)
  out["lm_modal_vs_bare_16k"] = dict(target(t("lm", "modal", 16384), t("lm", "bare", 16384),
                                            1.5), limit=1.5, informational=True)
  out["lm_flash_vs_bare_16k"] = {"ratio": (t("lm", "flash", 16384) / t("lm", "bare", 16384))
                                 if t("lm", "flash", 16384) and t("lm", "bare", 16384) else None,
                                 "informational": True}
  worst = [v for v in out["stack_modal_vs_bare"].values() if v["ratio"] is not None]
  out["stack_modal_vs_bare_worst"] = max(worst, key=lambda v: v["ratio"]) if worst else None
  return out


# -- figures ------------------------------------------------------------------------------------

def plot_hankel(result, path) -> None:
  plt = plots.pyplot()
  layers = len(result["trained"]["per_layer"])
  fig, axes = plt.subplots(1, layers, figsize=(3.6 * layers, 3.6), squeeze=False)
  for ax, i in zip(axes[0], range(layers)):
    for name, colour in (("trained", "C0"), ("random_init", "C3")):
      row = result[name]["per_layer"][i]
      k = result[name]["k"]
      ax.plot(k, row["p50"], color=colour, label=f"{name} (median)")
      ax.fill_between(k, row["p10"], row["p90"], color=colour, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_title(f"layer {i}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("sigma_k / sigma_1 (p10..p90 over channels)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Hankel singular-value decay of the byte LM's filters", fontsize=10)
  plots.save_figure(fig, path)


def plot_taps(rows, path) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for refine in sorted({r["refine_steps"] for r in rows}):
    mine = [r for r in rows if r["refine_steps"] == refine]
    n = [r["order"] for r in mine]
    style = "-o" if refine == 0 else "--s"
    label = "ERA + least squares" if refine == 0 else f"+ {refine} refinement steps"
    axes[0].plot(n, [r["rel_l2_p50"] for r in mine], style, label=f"{label} p50")
    axes[0].plot(n, [r["rel_l2_p90"] for r in mine], style, alpha=0.5, label=f"{label} p90")
    axes[1].plot(n, [r["l1_p50"] for r in mine], style, label=label)
    axes[2].plot(n, [r["distill_seconds"] for r in mine], style, label=label)
  for ax, name in zip(axes, ("relative l2 tap error", "l1 of the tap error (p50)",
                             "distill seconds (all filters)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("order N")
    ax.set_ylabel(name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  plots.save_figure(fig, path)


def plot_quality(result, path) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for refine in sorted({r["refine_steps"] for r in result["rows"]}):
    mine = [r for r in result["rows"] if r["refine_steps"] == refine]
    axes[0].plot([r["order"] for r in mine], [100 * r["ppl_rel_change"] for r in mine],
                 "-o" if refine == 0 else "--s",
                 label="no refinement" if refine == 0 else f"{refine} refinement steps")
  for level in (1, -1, 0.1, -0.1):
    axes[0].axhline(level, color="grey", ls=":" if abs(level) < 1 else "--", lw=0.8)
  axes[0].axhline(0, color="k", lw=0.8)
  axes[0].set_xscale("log", base=2)
  axes[0].set_xlabel("order N")
  axes[0].set_ylabel("perplexity change vs exact (%)")
  axes[0].set_title(f"byte LM, held-out set ({result['tokens']} bytes); exact ppl "
                    f"{result['exact']['ppl']:.4f}", fontsize=9)
  axes[0].legend(fontsize=7)
  axes[0].grid(True, alpha=0.3)
  if result["fixture"]:
    fx = result["fixture"]
    axes[1].plot([r["order"] for r in fx], [r["max_abs_relative"] for r in fx], "-o",
                 label="max |error| / max |logit|")
    axes[1].plot([r["order"] for r in fx], [r["rel_l2"] for r in fx], "-s", label="relative l2")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("order N")
    axes[1].set_title("HyenaDNA fixture: modal vs exact logits", fontsize=9)
    axes[1].legend(fontsize=7)
    axes[1].grid(True, which="both", alpha=0.3)
  plots.save_figure(fig, path)


def plot_agreement(results, path) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, res in zip(axes[0], results):
    for order, entry in res["orders"].items():
      kl = np.asarray(entry["kl_per_step"])
      ax.plot(np.arange(kl.size), np.cumsum(kl) / np.arange(1, kl.size + 1),
              label=f"order {order}: running mean KL (first divergence "
                    f"{entry['first_divergence']})")
      if entry["first_divergence"] is not None:
        ax.axvline(entry["first_divergence"], color=ax.lines[-1].get_color(), ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("generated token")
    ax.set_ylabel("KL(exact || modal), nats")
    ax.set_title("greedy" if res["temperature"] == 0 else f"temperature {res['temperature']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
  plots.save_figure(fig, path)


def plot_speed(rows, path) -> None:
  plt = plots.pyplot()
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.5 * (len(models) + 1), 4.2),
                           squeeze=False)
  colours = {"modal": "C2", "bare": "k", "flash": "C0", "lazy": "C1"}
  for ax, model in zip(axes[0], models):
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["model"] == model):
      mine = sorted((r for r in rows if (r["model"], r["strategy"]) == (model, strategy)),
                    key=lambda r: r["length"])
      ax.plot([r["length"] for r in mine], [r["per_token_seconds"] * 1e6 for r in mine], "-o",
              color=colours.get(strategy), label=strategy)
      sampled = [r for r in mine if r["method"] != "full"]
      if sampled:
        ax.plot([r["length"] for r in sampled], [r["per_token_seconds"] * 1e6 for r in sampled],
                "o", mfc="white", color=colours.get(strategy))
    plots.log_length_axes(ax, "microseconds per token")
    ax.set_title(model, fontsize=9)
    ax.legend(fontsize=7)
  ax = axes[0][-1]
  for model in models:
    for strategy in ("modal", "flash"):
      mine = sorted((r for r in rows if (r["model"], r["strategy"]) == (model, strategy)),
                    key=lambda r: r["length"])
      if mine:
        ax.plot([r["length"] for r in mine], [r["state_bytes"] for r in mine],
                "-o" if model == "stack" else "--o", color=colours[strategy],
                label=f"{model} {strategy}")
  plots.log_length_axes(ax, "state bytes per sequence")
  ax.legend(fontsize=7)
  plots.save_figure(fig, path)


def figure_path(out, name: str) -> pathlib.Path:
  out = pathlib.Path(out)
  return out.with_name(f"{out.stem}_{name}.png")


# -- main ---------------------------------------------------------------------------------------

def run_distill(f) -> dict[str, Any]:
  store = store_lib.Store(f.out)
  config, params, _ = byte_lm()
  dist = Distillations(params, config)
  windows = None
  tau = flags_lib.tau(f)
  for part in f.parts:
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; choose among {PARTS}.")
    start = time.perf_counter()
    if part == "a":
      result = run_hankel(store, f.sv_count)
      plot_hankel(result, figure_path(store.path, "hankel"))
      store.set("hankel", result)
    elif part == "b":
      rows = run_taps(store, dist, [int(n) for n in f.orders], f.refine_steps)
      plot_taps(rows, figure_path(store.path, "taps"))
      store.set("taps", {"rows": rows})
    elif part == "c":
      windows = heldout_windows(f.eval_windows, f.seq_len) if windows is None else windows
      result = run_quality(store, dist, [int(n) for n in f.quality_orders], f.refine_steps,
                           windows, f.eval_batch, f.within, f.fixture_dir,
                           [int(n) for n in f.fixture_orders], EngineOptions(tau=tau))
      plot_quality(result, figure_path(store.path, "quality"))
      store.set("quality", result)
    elif part == "d":
      windows = heldout_windows(f.eval_windows, f.seq_len) if windows is None else windows
      smallest = store.data.get("quality", {}).get("smallest_order_within")
      orders = list(dict.fromkeys([TARGET_ORDER] + ([smallest] if smallest else [])))
      results = run_agreement(store, dist, orders, f.gen_tokens, f.prompt_length, f.temperature,
                              f.seed, windows[0])
      plot_agreement(results, figure_path(store.path, "agreement"))
      store.set("agreement", [{k: v for k, v in r.items()} for r in results])
    else:
      sampling = sampling_lib.Sampling(lazy_above=f.lazy_full_max, positions=f.sample_positions,
                                       steps=f.sample_steps)
      rows, kinds = [], {}
      for kind, layers, width, lengths in (
          ("stack", f.stack_layers, f.stack_width, f.stack_lengths),
          ("lm", f.lm_layers, f.lm_width, f.lm_lengths)):
        kinds[kind] = speed_workload(kind, layers, width, f.lm_inner, SPEED_FILTER_LENGTH)
        rows += run_speed(store, kind, layers, width, f.lm_inner, [int(n) for n in lengths],
                          f.speed_strategies, f.speed_order, f.repeats, tau,
                          f.flash_max_length, f.lazy_max_length, f.lazy_full_max, sampling,
                          LongRuns(f.long_length, f.long_repeats, f.long_flash_base,
                                   f.flash_base))
      rows = stored_speed_rows(store, kinds, f.speed_order, rows)
      store_lib.write_csv(store.path.with_name(f"{store.path.stem}_speed.csv"), rows)
      plot_speed(rows, figure_path(store.path, "speed"))
      store.set("speed", {"rows": rows, "targets": speed_targets(rows),
                          "modal_order": f.speed_order,
                          "filter_length": SPEED_FILTER_LENGTH})
    logging.info("part %s done in %.1f s", part, time.perf_counter() - start)
  logging.info("wrote %s", store.path)
  return store.data


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  run_distill(flag_values)


if __name__ == "__main__":
  define_flags()
  app.run(main)
