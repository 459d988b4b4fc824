"""experiments/pallas_crossover.py runs end to end at tiny sizes (interpret mode on CPU)."""

from __future__ import annotations

import json
import math
import pathlib
import sys

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import pallas_crossover  # pylint: disable=g-import-not-at-top


def test_main_writes_a_finite_table(tmp_path):
  out = tmp_path / "sub" / "crossover.json"
  argv = ["pallas_crossover", f"--out={out}", "--sizes=1,2", "--streams=2", "--batch=1",
          "--channels=3", "--repeats=2", "--warmup=1"]
  fv = flags.FlagValues()
  pallas_crossover.define_flags(fv)
  fv(argv)
  pallas_crossover.main(argv[:1], fv)
  table = json.loads(out.read_text())

  assert table["backend"] == "cpu" and table["interpret"] is True
  assert table["shape"] == {"streams": 2, "batch": 1, "channels": 3, "dtype": "float32"}
  methods = set(pallas_crossover.METHODS)
  assert set(table["per_block_size"]) == {"1", "2"}
  for size, times in table["per_block_size"].items():
    assert set(times) == methods, size
    for method, seconds in times.items():  # everything runs on CPU (kernels interpreted)
      assert seconds is not None and math.isfinite(seconds) and seconds > 0, (size, method)
      compile_s = table["compile_seconds"][size][method]
      assert math.isfinite(compile_s) and compile_s > 0
      assert table["max_rel_error"][size][method] < 1e-5, (size, method)
    assert table["best"][size] in methods
  assert table["errors"] == {}
  crossover = table["crossover"]
  assert set(crossover) == {"direct_max_U", "pallas_max_U", "pallas_mxu_max_U"}
  assert all(value in (0, 1, 2) for value in crossover.values())


def test_crossover_rule():
  per_size = {
      1: {"direct": 1.0, "pallas": 3.0, "fft": 2.0},
      2: {"direct": 1.5, "pallas": 1.0, "fft": 2.0},
      4: {"direct": 2.5, "pallas": None, "fft": 2.0},
      8: {"direct": 1.0, "pallas": 1.0, "fft": 2.0},  # after a loss: not counted
  }
  assert pallas_crossover.crossover(per_size, "direct") == 2
  assert pallas_crossover.crossover(per_size, "pallas") == 0
  assert pallas_crossover.crossover(per_size, "pallas_mxu") == 0


def test_skips_and_errors_are_recorded(monkeypatch):
  """A method that fails (as the MXU kernel does on GPU) is an error entry, not a crash."""
  def broken(x, w):
    raise NotImplementedError("Unimplemented primitive in Pallas Triton lowering: roll")
  fns = pallas_crossover._method_fns(True)
  fns["pallas_mxu"] = broken
  monkeypatch.setattr(pallas_crossover, "_method_fns", lambda interpret: fns)
  table = pallas_crossover.run_crossover(
      [1, 2], streams=1, batch=1, channels=2, dtype="bfloat16", repeats=1, warmup=0,
      methods=["pallas_mxu", "direct"], interpret=True, max_direct_bytes=16)
  assert table["per_block_size"]["1"]["pallas_mxu"] is None
  assert "roll" in table["errors"]["1"]["pallas_mxu"]
  assert table["per_block_size"]["1"]["direct"] is not None        # 1*1*1*2*4 = 8 bytes
  assert table["per_block_size"]["2"]["direct"] is None            # 2*2*1*2*4 = 32 bytes
  assert table["errors"]["2"]["direct"].startswith("skipped")
  assert table["crossover"]["pallas_mxu_max_U"] == 0
  json.dumps(table, allow_nan=False)
