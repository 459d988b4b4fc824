"""experiments/distill.py: its pure helpers on tiny models, and a smoke run on tiny flags."""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import lcsm_jax  # pylint: disable=g-import-not-at-top
from experiments import distill as runner
from experiments.lib import workloads
from lcsm_jax.decoding import Rollout
from lcsm_jax.models import online_model
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.training import trainer

TINY_LM = dict(d_model=8, n_layer=2, d_inner=16, vocab_size=12, l_max=64, filter_order=8)


@pytest.fixture(scope="module")
def tiny_lm():
  config = lcsm_jax.HyenaConfig(**TINY_LM)
  params = lcsm_jax.init_params(config, jax.random.key(3))
  windows = np.random.default_rng(0).integers(0, 12, (2, 17)).astype(np.int32)
  return config, params, windows


def test_heldout_loss_equals_direct_computation(tiny_lm):
  config, params, windows = tiny_lm
  logits = HyenaLM(config).apply(params, jnp.asarray(windows[:, :-1]))
  direct = float(trainer.token_nll(logits, jnp.asarray(windows[:, 1:]), config.vocab_size).mean())
  assert runner.parallel_loss(params, config, windows, batch=1) == pytest.approx(direct, rel=1e-6)
  flash = runner.teacher_forced_loss(params, config, windows, "flash", batch=2,
                                     options=lcsm_jax.EngineOptions(tau=2))
  assert flash == pytest.approx(direct, rel=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    distilled = lcsm_jax.distill(params, config, order=4)
  modal = runner.teacher_forced_loss(params, config, windows, "modal", distilled, batch=1)
  taps = distilled.filters.taps(windows.shape[1] - 1)
  assert modal == pytest.approx(runner.parallel_loss(params, config, windows, 2, taps),
                                rel=1e-5)


def test_layer_split_with_exact_filters_is_exact(tiny_lm):
  config, params, windows = tiny_lm

  class Exact:  # "distilled" filters equal to the model's own
    class filters:  # pylint: disable=invalid-name
      @staticmethod
      def taps(length):
        return online_model(config).filters(params, length)[0]

  rows = runner.layer_split(params, config, windows, Exact)
  exact = runner.parallel_loss(params, config, windows)
  assert [r["layer"] for r in rows] == [0, 1]
  for row in rows:
    assert row["loss"] == pytest.approx(exact, rel=1e-5)


def test_small_helpers():
  assert runner.first_divergence([1, 2, 3], [1, 2, 4]) == 2
  assert runner.first_divergence([1, 2], [1, 2]) is None
  logits = np.random.default_rng(0).standard_normal((5, 7))
  assert np.allclose(runner.kl_per_step(logits, logits), 0, atol=1e-12)
  other = logits + np.random.default_rng(1).standard_normal((5, 7))
  p = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum(-1, keepdims=True)
  q = np.exp(other / 0.8) / np.exp(other / 0.8).sum(-1, keepdims=True)
  assert np.allclose(runner.kl_per_step(logits, other, 0.8), (p * np.log(p / q)).sum(-1))
  assert (runner.kl_per_step(logits, other, 0) > 0).all()  # greedy: the T = 1 distributions
  rows = [{"order": 4, "ppl_rel_change": -0.02}, {"order": 8, "ppl_rel_change": 5e-4},
          {"order": 16, "ppl_rel_change": -1e-4}]
  assert runner.smallest_within(rows, 1e-3) == 8
  assert runner.smallest_within(rows, 1e-5) is None
  q = runner.quantiles(np.arange(11.0))
  assert q == {"p10": 1.0, "p50": 5.0, "p90": 9.0}
  filters = runner.random_modal_filters(3, 4, 16)
  assert filters.poles.shape == (3, 4, 8)
  assert float(jnp.abs(filters.poles).max()) < 1


def test_long_runs_settings():
  long = runner.LongRuns(length=1024, repeats=1, flash_base=2, short_flash_base=4)
  assert long.settings(512, 3) == (3, 1, 4)
  assert long.settings(1024, 3) == (1, 0, 2)
  assert long.settings(4096, 5) == (1, 0, 2)


def test_speed_targets():
  def row(model, strategy, length, us):
    return {"model": model, "strategy": strategy, "length": length,
            "per_token_seconds": us * 1e-6}
  rows = [row("stack", "modal", 1024, 10), row("stack", "modal", 16384, 11),
          row("stack", "modal", 1 << 20, 12), row("stack", "bare", 1024, 8),
          row("stack", "bare", 1 << 20, 7), row("stack", "flash", 16384, 40),
          row("lm", "modal", 16384, 100), row("lm", "flash", 16384, 120)]
  t = runner.speed_targets(rows)
  assert t["stack_modal_longest_vs_1k"]["ratio"] == pytest.approx(1.2)
  assert t["stack_modal_longest_vs_1k"]["met"] and t["stack_modal_longest_vs_1k"][
      "measured_at_asked"]
  assert t["stack_modal_vs_bare"]["1024"]["ratio"] == pytest.approx(1.25)
  assert not t["stack_modal_vs_bare"][str(1 << 20)]["met"]  # 12 / 7 > 1.5
  assert t["stack_modal_vs_bare_worst"]["ratio"] == pytest.approx(12 / 7)
  assert t["stack_modal_speedup_vs_flash_16k"]["ratio"] == pytest.approx(40 / 11)
  assert t["stack_modal_speedup_vs_flash_16k"]["met"]
  assert not t["lm_modal_speedup_vs_flash_16k"]["met"]  # 1.2 < 1.3


def test_bare_step_is_the_stack_without_long_convolutions():
  """The bare step equals the stack whose taps beyond tap 0 are zero, rolled out by flash."""
  work = workloads.Workload("stack", 2, 4, max_length=16)
  params = work.params()
  cut = dict(params, taps=params["taps"].at[:, 1:].set(0))
  program = runner.bare_program(work, params, 16)
  outputs, _, _ = program.run()
  head = jnp.asarray(work.inputs(1))
  flash = Rollout(cut, ConvStack(2, 4, 16), "flash", tau=2)
  _, state = flash.prefill(head)
  expected, _ = flash.run(state, 15)
  np.testing.assert_allclose(np.asarray(outputs), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_smoke_run_writes_json(tmp_path):
  out = tmp_path / "distill" / "distill.json"
  fv = flags.FlagValues()
  runner.define_flags(fv)
  fv(["runner", f"--out={out}", "--parts=c,e", "--quality_orders=2", "--refine_steps=0",
      "--eval_windows=2", "--seq_len=8", "--eval_batch=2", "--fixture_dir=", "--stack_layers=2",
      "--stack_width=4", "--stack_lengths=16,32", "--lm_lengths=", "--speed_order=4",
      "--speed_strategies=modal,bare,flash", "--tau=2", "--repeats=2", "--long_length=32"])
  runner.main([], fv)
  data = json.loads(out.read_text())
  assert set(data) >= {"machine", "points", "quality", "speed"}
  quality = data["quality"]
  assert quality["exact"]["loss"] > 0 and quality["exact"]["ppl"] > 1
  assert not quality["metrics_json_check"]["full_heldout_set"]
  assert abs(quality["exact"]["flash_vs_parallel"]) < 1e-4
  assert [(r["order"], r["refine_steps"]) for r in quality["rows"]] == [(2, 0)]
  assert quality["rows"][0]["loss"] > 0 and "order16_within_1pct" in quality["targets"]
  assert {(r["strategy"], r["length"]) for r in data["speed"]["rows"]} == {
      (s, n) for s in ("modal", "bare", "flash") for n in (16, 32)}
  assert "stack_modal_vs_bare" in data["speed"]["targets"]
  speed_keys = [json.loads(k) for k in data["points"] if json.loads(k).get("part") == "e"]
  for key in speed_keys:  # from --long_length on: one run, no warm-up, flash with base 2
    long = key["length"] >= 32
    assert key["repeats"] == (1 if long else 2) and ("warmup" in key) is long, key
    assert key.get("base") == (2 if long and key["strategy"] == "flash" else None), key
  assert all(r["per_token_seconds"] > 0 for r in data["speed"]["rows"])
  modal_state = {r["state_bytes"] for r in data["speed"]["rows"] if r["strategy"] == "modal"}
  assert modal_state == {2 * 4 * 2 * 8 + 2 * 4 * 4}  # S D N/2 complex + S D pending, any L
  for name in ("quality", "speed"):
    assert (out.parent / f"distill_{name}.png").stat().st_size > 0
  assert (out.parent / "distill_speed.csv").exists()


def test_language_model_bare_step_is_modal_with_zero_residues():
  """The LM's bare step equals modal on filters whose taps beyond tap 0 are zero."""
  work = workloads.Workload("lm", 2, 8, 1, 16, 2, 32)
  params = work.params()
  logits, _ = runner.bare_program(work, params, 32).run()
  zero = runner.random_modal_filters(work.streams, 8, 2)
  zero = type(zero)(zero.poles, zero.residues * 0, zero.h0)
  decoder = lcsm_jax.Decoder(params, work.config(), "modal", max_length=32, distilled=zero)
  ids = work.inputs(32)
  expected, _ = decoder.score(decoder.prefill(ids[:, :1]), ids[:, 1:])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_speed_summary_keeps_every_stored_point():
  """Part e's summary rows come from every stored point of the workloads (the last stored per
  (model, strategy, length)), with this run's rows over them: a run at a few lengths updates
  the summary instead of replacing it."""
  import types  # pylint: disable=g-import-not-at-top
  from experiments import distill  # pylint: disable=g-import-not-at-top
  from experiments.lib import store as store_lib  # pylint: disable=g-import-not-at-top

  stack = distill.speed_workload("stack", 2, 4, 8, 16)
  lm = distill.speed_workload("lm", 2, 4, 8, 16)
  entry = lambda us: {"per_token_seconds": us * 1e-6, "total_seconds": 1.0, "method": "full",
                      "compile_seconds": 0.1, "state_bytes": 64}
  point = lambda work, **config: store_lib.key_of(**dict(work.describe(), part="e", **config))
  points = {
      point(stack, strategy="flash", length=64, repeats=3): entry(10),
      point(stack, strategy="flash", length=64, repeats=1): entry(11),   # stored last: kept
      point(stack, strategy="modal", length=64, repeats=3, order=4): entry(2),
      point(stack, strategy="modal", length=64, repeats=3, order=8): entry(3),  # other order
      point(lm, strategy="bare", length=128, repeats=3): entry(50),
      point(lm.replace(width=8), strategy="bare", length=128, repeats=3): entry(99),
      store_lib.key_of(part="b", order=4): {"tap_error": 0.1},
  }
  measured = [distill.speed_row("lm", "bare", 128, entry(40))]
  rows = distill.stored_speed_rows(types.SimpleNamespace(points=points),
                                   {"stack": stack, "lm": lm}, 4, measured)
  got = {(r["model"], r["strategy"], r["length"]): r["per_token_seconds"] * 1e6 for r in rows}
  assert got == pytest.approx({("lm", "bare", 128): 40, ("stack", "flash", 64): 11,
                               ("stack", "modal", 64): 2})
  assert [(r["model"], r["strategy"]) for r in rows] == sorted(
      (r["model"], r["strategy"]) for r in rows)
