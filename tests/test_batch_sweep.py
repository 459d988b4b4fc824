"""experiments/batch_sweep.py and bench_generate --step_weights on a tiny language model: every
(batch, strategy, dtype) point is measured and written (JSON, CSV, PNG); a re-run skips them."""

import csv
import json
import pathlib
import warnings

from absl import flags
import pytest

from experiments import batch_sweep
from experiments import bench_generate

TINY = ["--layers=2", "--width=4", "--inner_width=8", "--tau=2", "--repeats=1"]


def _run(module, out: pathlib.Path, *argv: str) -> dict:
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["runner", f"--out={out}", *argv])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the tiny model's filters distil poorly at order 4
    module.main([], fv)
  return json.loads(out.read_text())


def test_batch_sweep_writes_every_point(tmp_path):
  out = tmp_path / "sweep.json"
  argv = [*TINY, "--length=24", "--batches=1,3", "--modal_order=4",
          "--bf16_strategies=flash,modal"]
  data = _run(batch_sweep, out, *argv)
  rows = data["table"]["points"]
  got = {(r["batch"], r["strategy"], r["step_weights"]) for r in rows}
  assert got == {(b, s, d) for b in (1, 3) for s in ("flash", "lazy", "modal")
                 for d in ("float32", "bfloat16") if d == "float32" or s != "lazy"}
  for r in rows:
    assert r["tokens_per_second"] == pytest.approx(r["batch"] * 23 / r["total_seconds"])
    assert len(r["load_average"]) == 3
  assert data["distill"]["order"] == 4
  with open(out.with_suffix(".csv")) as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  assert out.with_suffix(".png").stat().st_size > 0
  points = dict(data["points"])
  again = _run(batch_sweep, out, *argv)  # every point stored: nothing measured again
  assert again["points"] == points


def test_batch_sweep_refuses_bad_flags(tmp_path):
  with pytest.raises(Exception, match="batches"):
    _run(batch_sweep, tmp_path / "x.json", *TINY, "--batches=0")
  with pytest.raises(Exception, match="lm"):
    _run(batch_sweep, tmp_path / "x.json", *TINY, "--model=stack")


def test_bench_generate_step_weights_side_by_side(tmp_path):
  out = tmp_path / "lm.json"
  data = _run(bench_generate, out, *TINY, "--model=lm", "--length=16", "--strategies=flash",
              "--step_weights=float32,bfloat16")
  keys = list(data["results"])
  assert len(keys) == 2
  assert sum('"step_weights":"bfloat16"' in k for k in keys) == 1
  assert all("step_weights" not in k for k in keys if "bfloat16" not in k)
  generated = [k for k in data["points"] if '"what":"generate"' in k]
  assert len(generated) == 2
