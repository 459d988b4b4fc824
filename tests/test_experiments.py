"""Every measurement runner in experiments/ end to end at tiny sizes, into a temporary folder.

Each runner's `main` is called with its flags parsed into a private `FlagValues` (the runners
define their flags only when run as scripts, so importing all of them here cannot clash), and
its JSON is checked for the promised keys and positive values. The tiny sizes say nothing about
performance; they prove the runners work before the lead runs them at full size.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import ablations  # pylint: disable=g-import-not-at-top
from experiments import bench_generate
from experiments import block_crossover
from experiments import headline
from experiments import latency
from experiments import long_run
from experiments import memory
from experiments import scaling
from experiments import sharding as sharding_runner
from experiments import transforms
from experiments.lib import blocks as block_timing
from experiments.lib import flags as flags_lib
from experiments.lib import machine as machine_lib
from experiments.lib import sampling as sampling_lib
from experiments.lib import store as store_lib
from experiments.lib import workloads
from lcsm_jax.tuning import machine

TINY = ["--layers=2", "--width=4", "--tau=2", "--repeats=1"]


def _run(module, out: pathlib.Path, *argv: str) -> dict:
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["runner", f"--out={out}", *argv])
  module.main([], fv)
  return json.loads(out.read_text())


def _positive_numbers(tree, path="") -> list[str]:
  """Paths of the numbers in `tree` that are not > 0 (booleans and ints like 0 excluded by
  callers choosing the subtree)."""
  bad = []
  if isinstance(tree, dict):
    for k, v in tree.items():
      bad += _positive_numbers(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      bad += _positive_numbers(v, f"{path}[{i}]")
  elif isinstance(tree, float) and not tree > 0:
    bad.append(path)
  return bad


def test_bench_generate_stack_every_method(tmp_path, monkeypatch):
  out = tmp_path / "bench.json"
  argv = [*TINY, "--length=24", "--sample_above=16", "--sample_recompute_above=16",
          "--eager_max=16", "--sample_positions=2", "--sample_steps=4",
          "--bandwidth_megabytes=8"]
  data = _run(bench_generate, out, *argv)
  assert set(data) >= {"machine", "points", "results"}
  assert data["machine"]["cpus"] >= 1 and data["machine"]["jax"]
  (result,) = data["results"].values()
  assert result["offline_forward"]["seconds"] > 0
  assert result["read_bandwidth_bytes_per_second"] > 1e8
  strategies = result["strategies"]
  assert set(strategies) == {"flash", "lazy", "eager", "recompute"}
  assert {s: e["method"] for s, e in strategies.items()} == {
      "flash": "full", "lazy": "sampled", "eager": "extrapolated", "recompute": "sampled"}
  for name, entry in strategies.items():
    for field in ("total_seconds", "per_token_seconds", "compile_seconds", "speedup_vs_lazy",
                  "vs_offline_forward", "peak_rss_bytes_so_far"):
      assert entry[field] > 0, (name, field)
    assert entry["per_token_seconds"] == pytest.approx(entry["total_seconds"] / 23)
    assert entry["xla_memory"]["peak_bytes"] > 0
  assert strategies["lazy"]["speedup_vs_lazy"] == 1.0
  assert strategies["lazy"]["mixing_roofline_seconds"] > 0
  assert strategies["flash"]["prepare_seconds"] > 0
  assert isinstance(strategies["flash"]["resolved_tau"], int)  # tau='auto', as resolved
  assert "resolved_tau" not in strategies["lazy"]
  assert len(strategies["lazy"]["sample_per_token_seconds"]) == 2
  assert [b["bucket"] for b in strategies["recompute"]["buckets"]] == [24]
  assert strategies["recompute"]["head_positions"] == 15
  assert strategies["eager"]["fit_lengths"] == [8, 9, 16]

  # A re-run measures nothing: every point is in the JSON already.
  def fail(*args, **kwargs):
    raise AssertionError("measured again")
  monkeypatch.setattr(sampling_lib, "measure_strategy", fail)
  monkeypatch.setattr(machine_lib, "read_bandwidth", fail)
  again = _run(bench_generate, out, *argv)
  assert again["points"] == data["points"]


def test_bench_generate_language_model(tmp_path):
  data = _run(bench_generate, tmp_path / "lm.json", *TINY, "--model=lm", "--inner_width=8",
              "--length=16", "--strategies=flash,lazy", "--bandwidth_megabytes=8")
  (result,) = data["results"].values()
  assert result["config"]["model"] == "lm" and result["config"]["streams"] == 2
  for entry in result["strategies"].values():
    assert entry["method"] == "full" and entry["total_seconds"] > 0
    assert entry["vs_offline_forward"] > 0 and entry["speedup_vs_lazy"] > 0


def test_headline_table_rows(tmp_path):
  stack = _run(bench_generate, tmp_path / "bench_generate_stack_24.json", *TINY,
               "--length=24", "--strategies=flash,lazy,recompute", "--bandwidth_megabytes=8")
  lm = _run(bench_generate, tmp_path / "bench_generate_lm_16.json", *TINY, "--model=lm",
            "--inner_width=8", "--length=16", "--strategies=flash",
            "--bandwidth_megabytes=8")
  lines = headline.table(headline.result_files(tmp_path)).splitlines()
  assert lines[0] == headline.HEADER.splitlines()[0] and len(lines) == 4
  (result,) = stack["results"].values()
  runs = result["strategies"]
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert cells[:2] == ["mixing-only stack, 2 layers x 4 channels", "24"]
  flash = runs["flash"]["total_seconds"]
  assert cells[4] == headline.ratio(flash / result["offline_forward"]["seconds"])
  assert cells[6] == f"**{headline.ratio(runs['lazy']['total_seconds'] / flash)}**"
  assert cells[7].startswith(headline.ratio(runs["recompute"]["total_seconds"] / flash))
  lm_cells = [c.strip() for c in lines[3].strip("|").split("|")]
  assert lm_cells[0] == "Hyena LM, d_model 4, 2 layers, d_inner 8" and lm_cells[5:] == [""] * 3
  assert headline.machines(headline.result_files(tmp_path)) == {machine.cpu_model()}
  assert headline.seconds(0.15108) == "0.151 s" and headline.seconds(1557.2) == "1557 s"
  assert headline.per_token(1.4e-4) == "140 us/token" and headline.ratio(8.329) == "8.33x"


def test_readme_headline_table_is_the_committed_results(capsys):
  """README.md's table is the one `python -m experiments.headline` makes from the JSON."""
  text = headline.README.read_text("utf-8")
  assert headline.readme_table(text) == headline.table(headline.result_files())
  fv = flags.FlagValues()
  headline.define_flags(fv)
  fv(["headline"])  # without --write the runner prints the table and writes nothing
  headline.main([], fv)
  assert capsys.readouterr().out.strip() == headline.readme_table(text)
  assert headline.README.read_text("utf-8") == text
  assert headline.replace_in(text, "T") != text and headline.readme_table(
      headline.replace_in(text, "T")) == "T"


def test_scaling(tmp_path):
  out = tmp_path / "scaling.json"
  data = _run(scaling, out, *TINY, "--lengths=16", "--flash_lengths=32",
              "--strategies=flash,lazy", "--fit_range=16,64", "--check_memory_above=32")
  rows = list(csv_rows(out.with_suffix(".csv")))
  assert {(r["strategy"], int(r["length"])) for r in rows} == {
      ("forward", 16), ("forward", 32), ("flash", 16), ("flash", 32), ("lazy", 16)}
  assert all(float(r["total_seconds"]) > 0 for r in rows)
  assert data["fits"]["flash"]["lengths"] == [16, 32]
  assert np.isfinite(data["fits"]["flash"]["exponent"])
  assert data["skipped"] == []
  estimates = [v for k, v in data["points"].items() if '"what":"estimate"' in k]
  assert len(estimates) == 1 and estimates[0]["peak_bytes"] > 0
  assert out.with_suffix(".png").stat().st_size > 0

  # --replot redraws from the CSV and JSON (measuring nothing), adding a long run of the same
  # model and leaving out one of another model
  flash = {"total_seconds": 6.3, "compile_seconds": 1.0, "method": "full"}
  long_json = tmp_path / "long_run.json"
  long_json.write_text(json.dumps({"points": {
      "a": {"ran": {"model": "stack", "layers": 2, "width": 4, "batch": 1},
            "requested": {"length": 64}, "flash": flash},
      "b": {"ran": {"model": "stack", "layers": 2, "width": 8, "batch": 1},
            "requested": {"length": 128}, "flash": flash}}}))
  out.with_suffix(".png").unlink()
  fv = flags.FlagValues()
  scaling.define_flags(fv)
  fv(["scaling", f"--out={out}", *TINY, "--lengths=16", "--replot", f"--long_run={long_json}"])
  scaling.main([], fv)
  assert out.with_suffix(".png").stat().st_size > 0
  rows = scaling.replot(out, {"model": "stack", "layers": 2, "width": 4, "batch": 1},
                        str(long_json))
  (long,) = [r for r in rows if r["strategy"] == scaling.LONG_RUN]
  assert long["length"] == 64 and long["per_token_seconds"] == pytest.approx(6.3 / 63)
  assert len(rows) == 6 and json.loads(out.read_text())["fits"] == data["fits"]


def test_scaling_skips_what_does_not_fit(tmp_path):
  data = _run(scaling, tmp_path / "s.json", *TINY, "--lengths=", "--flash_lengths=32",
              "--strategies=flash", "--check_memory_above=32", "--memory_fraction=1e-12")
  assert data["skipped"][0]["length"] == 32 and "needs" in data["skipped"][0]["reason"]


def test_block_crossover(tmp_path, monkeypatch):
  monkeypatch.setenv("LCSM_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LCSM_JAX_CROSSOVER", raising=False)
  out = tmp_path / "crossover.json"
  data = _run(block_crossover, out, "--layers=2", "--width=4", "--repeats=1", "--max_size=2",
              "--length=16", "--taus=auto,fft,direct", "--max_direct_size=4", "--write_cache")
  summary = data["summary"]
  for timing in ("in_loop", "per_call"):
    table = summary["tables"][timing]
    assert sorted(table, key=int) == ["1", "2"]
    assert all(v["fft"] > 0 for v in table.values())
    assert summary["crossover"][timing] in (0, 1, 2)
  # tau='auto' now reads what was written
  assert summary["autotune_crossover"] == summary["crossover"]["in_loop"]
  cache = json.loads((tmp_path / "cache" / "crossover.json").read_text())
  (entry,) = cache.values()
  assert entry["crossover"] == summary["crossover"]["in_loop"] and entry["channels"] == 8
  assert "skipped" in summary["taus"]["direct"]  # direct blocks up to 8 > max_direct_size
  for tau in ("auto", "fft"):
    assert summary["taus"][tau]["total_seconds"] > 0
  assert summary["best_tau"] in ("auto", "fft") and summary["auto_vs_best"] >= 1
  assert out.with_suffix(".png").stat().st_size > 0


def test_ablations(tmp_path):
  out = tmp_path / "ablations.json"
  data = _run(ablations, out, *TINY, "--inner_width=8", "--length=16", "--lm_length=16",
              "--sweeps=layer_parallel,order", "--orders=3")
  sweeps = data["sweeps"]
  assert set(sweeps) == {"layer_parallel", "order"}
  assert [r["value"] for r in sweeps["layer_parallel"]] == [True, False]
  for row in sweeps["layer_parallel"]:
    assert row["flash_seconds"] > 0 and "lazy_seconds" not in row
  for row in sweeps["order"]:
    assert row["flash_seconds"] > 0 and row["lazy_seconds"] > 0 and row["speedup_vs_lazy"] > 0
  assert '"order":3' in "".join(data["points"])
  assert out.with_suffix(".png").stat().st_size > 0


def test_memory(tmp_path):
  out = tmp_path / "memory.json"
  data = _run(memory, out, *TINY, "--lengths=64", "--strategies=flash,lazy,eager,recompute",
              "--rss_max_length=0")
  rows = data["rows"]
  assert [r["strategy"] for r in rows] == ["flash", "lazy", "eager", "recompute"]
  for row in rows:
    assert row["state_bytes"] > 0 and row["xla_peak_bytes"] > 0, row
  flash = {r["length"]: r for r in rows if r["strategy"] == "flash"}
  # flash (base 4, M = 63) keeps an input and a pending output in rings of the largest block
  # (16 positions: 2 bytes per position), staging buffers of one tile, and the spectra of its
  # groups' input blocks (top level: 2 slots of 17 complex values, 4.25 bytes per position;
  # level 4: 2 slots of 5, 1.25): 7.5 bytes per position and more with the staging
  assert 7.5 <= flash[64]["state_bytes_per_token_per_channel"] <= 9
  # one real run in a fresh process, for its peak resident set
  rss = memory.measure_rss(workloads.Workload("stack", 2, 4, max_length=32), "recompute", 32, 2)
  assert rss["rss_peak_bytes"] >= rss["rss_before_run_bytes"] > 10 * 2**20
  assert rss["rss_run"] == "positions [28, 32) after a prompt of 28"


def test_latency(tmp_path):
  out = tmp_path / "latency.json"
  data = _run(latency, out, *TINY, "--length=32", "--passes=1")
  (summary,) = data["points"].values()
  (plain,) = summary["variants"].values()
  for part in (plain["measured"], plain["in_loop"]["model"]):
    assert part["max"] >= part["p99"] >= part["median"] > 0
    assert 1 <= part["argmax_position"] <= 31
  assert plain["in_loop"]["total_seconds"] > 0 and plain["in_loop_total_vs_first"] == 1
  assert set(plain["in_loop"]["block_seconds_per_size"]) == {"1", "2", "4", "8", "16"}
  assert plain["per_block_size"]["16"]["positions"] == 1
  assert plain["per_block_size"]["1"]["positions"] == 15
  assert len(plain["spikes"]) == 10
  rows = list(csv_rows(out.with_suffix(".csv")))
  assert len(rows) == 31 and {int(r["block_size"]) for r in rows} == {0, 1, 2, 4, 8, 16}


def test_latency_compares_smoothing_side_by_side(tmp_path):
  out = tmp_path / "latency.json"
  data = _run(latency, out, *TINY, "--length=80", "--passes=1", "--base=4", "--tau=1",
              "--smooth=false,1", "--concurrency_scheduler=on")  # XLA_FLAGS left alone
  (summary,) = data["points"].values()
  assert list(summary["variants"]) == ["plain", "smoothed_above_1"]
  assert summary["config"]["resolved_tau"] == 1 and summary["config"]["dft_matmul_max"] > 0
  smoothed = summary["variants"]["smoothed_above_1"]
  assert smoothed["in_loop_total_vs_first"] > 0 and "model" not in smoothed["in_loop"]
  assert smoothed["in_loop"]["resolved_tau"] == 1
  plain = summary["variants"]["plain"]
  rounds = [s / p for s, p in zip(smoothed["in_loop"]["rounds_seconds"],
                                  plain["in_loop"]["rounds_seconds"])]
  assert smoothed["in_loop_total_vs_first_per_round"] == pytest.approx(rounds)
  assert smoothed["in_loop_total_vs_first"] == pytest.approx(float(np.median(rounds)))
  assert smoothed["per_block_size"]["16"]["positions"] == 3   # 16, 32, 48 (64: class 64)
  assert smoothed["per_block_size"]["64"]["positions"] == 1
  rows = list(csv_rows(out.with_suffix(".csv")))
  assert len(rows) == 79 and "smoothed_above_1_measured_seconds" in rows[0]
  with pytest.raises(ValueError, match="smooth must be"):
    latency.parse_smooth("0")


def test_transforms(tmp_path):
  out = tmp_path / "transforms.json"
  data = _run(transforms, out, "--sizes=2,4", "--rows=8", "--count=2", "--repeats=1")
  assert len(data["points"]) == 4  # two sizes, two methods
  (summary,) = [v for k, v in data.items() if k.startswith("summary")]
  assert set(summary["table"]) == {"2", "4"} and summary["rows"] == 8
  for row in summary["table"].values():
    assert row["fft"] > 0 and row["matmul"] > 0
    assert row["matmul_over_fft"] == pytest.approx(row["matmul"] / row["fft"])
  assert summary["largest_matmul_win"] in (0, 2, 4)
  assert [int(r["size"]) for r in csv_rows(out.with_suffix(".csv"))] == [2, 4]
  assert out.with_suffix(".png").stat().st_size > 0
  with pytest.raises(ValueError, match="positive"):
    transforms.parse_sizes(["0"])


def test_long_run(tmp_path):
  out = tmp_path / "long.json"
  data = _run(long_run, out, "--model=stack", "--preset=tiny-1k", "--length=64",
              "--eta_length=32", "--tau=2", "--lazy_max_position=32", "--lazy_steps=4",
              "--bandwidth_megabytes=8")
  (result,) = data["points"].values()
  assert result["ran"]["model"] == "stack" and result["attempts"][0]["fits"]
  assert result["flash"]["total_seconds"] > 0 and result["flash"]["tokens_per_second"] > 0
  assert result["eta"]["predicted_seconds"] > 0
  lazy = result["lazy_projection"]
  assert lazy["projected_seconds"] > 0 and lazy["mixing_roofline_seconds"] > 0
  assert result["projected_speedup_vs_lazy"] > 0
  assert result["state_bytes_per_token"] > 0


def test_long_run_reports_what_does_not_fit(tmp_path):
  data = _run(long_run, tmp_path / "l.json", "--model=stack", "--preset=tiny-1k",
              "--length=32", "--memory_fraction=1e-12", "--nofallback")
  (result,) = data["points"].values()
  assert "skipped" in result and not result["attempts"][0]["fits"]
  assert result["attempts"][0]["estimate"]["peak_bytes"] > 0
  # the fallback chain: the model, without precomputed spectra, then ever narrower stacks
  chain = long_run.candidates("lm", "large-1m", 2**20, 1, "auto", True)
  assert [(w.kind, w.width, o.precomputed_spectra) for w, o in chain] == [
      ("lm", 256, True), ("lm", 256, False), ("stack", 256, True), ("stack", 128, True),
      ("stack", 64, True), ("stack", 32, True), ("stack", 16, True)]


def test_lib_helpers(tmp_path):
  assert workloads.lazy_bytes(4, streams=2, batch=1, width=3) == (1 + 2 + 3) * 2 * 3 * 4 * 2
  assert block_timing.powers_of_two(3, 40) == [4, 8, 16, 32]
  fv = flags.FlagValues()
  flags_lib.define_tau_flag(fv)
  fv(["runner", "--tau=16"])
  assert flags_lib.tau(fv) == 16
  fv(["runner", "--tau=auto"])
  assert flags_lib.tau(fv) == "auto"
  with pytest.raises(flags.IllegalFlagValueError, match="tau must be"):
    fv(["runner", "--tau=-3"])
  assert block_timing.crossover({1: {"direct": 1, "fft": 2}, 2: {"direct": 3, "fft": 2},
                                 4: {"direct": 1, "fft": 2}}) == 1
  assert block_crossover.max_direct_block("auto", 40, crossover=4) == 4
  assert block_crossover.max_direct_block("direct", 40, crossover=4) == 32
  assert block_crossover.max_direct_block("fft", 40, crossover=4) == 0
  assert latency.lowbits(8).tolist() == [1, 2, 1, 4, 1, 2, 1, 0]
  assert latency.lowbits(20, 4).tolist() == [1, 1, 1, 4, 1, 1, 1, 4, 1, 1, 1, 4, 1, 1, 1, 16,
                                             1, 1, 1, 0]
  store = store_lib.Store(tmp_path / "s.json")
  calls = []
  assert store.run("k", lambda: calls.append(1) or {"x": 1.0}) == {"x": 1.0}
  assert store_lib.Store(tmp_path / "s.json").run("k", lambda: calls.append(2)) == {"x": 1.0}
  assert calls == [1]
  # a store from another machine is set aside, not mixed with new points
  data = json.loads((tmp_path / "s.json").read_text())
  data["machine"]["cpus"] = -1
  (tmp_path / "s.json").write_text(json.dumps(data))
  assert store_lib.Store(tmp_path / "s.json").get("k") is None
  assert len(list(tmp_path.glob("s.json.*.other-machine"))) == 1
  # ... and so is one from another CPU model with the same architecture and core count
  store_lib.Store(tmp_path / "s.json").run("k", lambda: {"x": 2.0})
  data = json.loads((tmp_path / "s.json").read_text())
  assert data["machine"]["cpu_model"] == machine.cpu_model() != ""
  data["machine"]["cpu_model"] = "another CPU"
  (tmp_path / "s.json").write_text(json.dumps(data))
  assert store_lib.Store(tmp_path / "s.json").get("k") is None
  assert len(list(tmp_path.glob("s.json.*.other-machine"))) == 2


def csv_rows(path):
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline="") as f:
    yield from csv.DictReader(f)


OLD_ENGINE = {"engine", "generation", "online", "synthetic", "mixing", "blocks", "schedule",
              "sampling", "memory"}


def test_sharding_bytes_per_device_from_shardings():
  """Per-device bytes are each array's shard (NamedSharding.shard_shape) times its item size."""
  import jax  # pylint: disable=g-import-not-at-top

  class Split:
    """A stand-in sharding splitting axis `axis` into `parts` (no devices needed)."""

    def __init__(self, axis, parts):
      self.axis, self.parts = axis, parts

    def shard_shape(self, shape):
      return tuple(n // self.parts if i == self.axis else n for i, n in enumerate(shape))

  shapes = {"a": jax.ShapeDtypeStruct((16, 8, 4), np.float32),
            "b": jax.ShapeDtypeStruct((6,), np.int8)}
  got = sharding_runner.bytes_per_device(shapes, {"a": Split(2, 4), "b": Split(0, 1)})
  assert got == 16 * 8 * 1 * 4 + 6
  assert sharding_runner.global_bytes(shapes) == 16 * 8 * 4 * 4 + 6
  one = jax.sharding.NamedSharding(jax.make_mesh((1, 1), ("data", "model")),
                                   jax.sharding.PartitionSpec(None, "model"))
  assert sharding_runner.bytes_per_device(shapes["a"], one) == 16 * 8 * 4 * 4
  with pytest.raises(ValueError, match="2 arrays but 1 shardings"):
    sharding_runner.bytes_per_device(shapes, [one])
  assert sharding_runner.mesh_shape("2x4") == (2, 4)
  with pytest.raises(ValueError, match=r"'dataxmodel' with positive integers \(e.g. 2x4\), got '2,4'"):
    sharding_runner.mesh_shape("2,4")
  assert sharding_runner.divides(8, (2, 4)) and not sharding_runner.divides(1, (8, 1))


def test_sharding_runner(tmp_path):
  # in this process JAX has one device: only the (1, 1) mesh runs
  out = _run(sharding_runner, tmp_path / "sharding.json", "--preset=tiny-1k", "--positions=64",
             "--meshes=1x1,2x2", "--strategies=flash", "--batches=1", "--speed_width=8",
             "--speed_tokens=4", "--repeats=1", "--host_devices=1", "--tau=4")
  (row,) = out["bytes"]
  assert row["mesh"] == [1, 1] and row["state_bytes"] == row["state_bytes_per_device"] > 0
  assert row["params_bytes_per_device"] == row["params_bytes"] > 0
  assert out["speed"][0]["tokens_per_s"] > 0
  assert (tmp_path / "sharding.png").exists()


def test_sharding_real_run_from_a_prompt(tmp_path):
  """(c) at a tiny size on one device: a prompt, then generation in calls, with each phase's
  time and the bytes per device."""
  out = _run(sharding_runner, tmp_path / "sharding.json", "--preset=tiny-1k", "--positions=64",
             "--meshes=1x1", "--strategies=flash", "--batches=1", "--nospeed",
             "--host_devices=1", "--tau=4", "--real_run", "--real_mesh=1x1",
             "--real_prompt=40", "--real_chunk=16")
  run = out["real_run"]
  assert run["mesh"] == [1, 1] and run["prompt_length"] == 40 and run["generated_tokens"] == 24
  assert run["tokens_in_vocabulary"] and run["options"] == {"base": 2,
                                                            "precomputed_spectra": False}
  assert min(run["tables_s"], run["prefill_s"], run["generation_s"]) > 0
  (device, peak), = run["peak_bytes_per_device"].items()
  assert peak == run["held_bytes_per_device_before_prefill"][device] + run[
      "xla_estimate_bytes"]["prefill (state included)"] > 0
  assert "speed" not in out  # --nospeed on a new store: nothing measured, nothing written


def test_sharding_live_bytes_count_each_shard_once():
  """Two calls in a row agree (reading shards' data would add an array per shard) and count a
  new array's bytes on its device."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  gc.collect()
  gc.disable()  # no other test's arrays freed between the calls
  try:
    first = sharding_runner.live_bytes_per_device()
    assert sharding_runner.live_bytes_per_device() == first
    x = jax.device_put(np.zeros((1 << 18,), np.float32), jax.devices()[0])
    device = str(jax.devices()[0])
    assert sharding_runner.live_bytes_per_device()[device] == first.get(device, 0) + x.nbytes
  finally:
    gc.enable()


def test_experiments_use_public_names_only():
  """No runner imports the old engine's modules or a private name of the package."""
  import ast  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1] / "experiments"
  problems = []
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lcsm_jax"):
        names = [node.module + "." + a.name for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      for name in names:
        parts = name.split(".")
        if parts[0] == "lcsm_jax" and (
            (len(parts) > 1 and parts[1] in OLD_ENGINE) or any(p.startswith("_") for p in parts)):
          problems.append(f"{path.relative_to(root)}:{node.lineno} {name}")
  assert not problems
