"""experiments/side_by_side.py on tiny models: every configuration is timed in every round,
the ratios are those of the recorded seconds, and bad configurations are refused."""

import csv
import json
import statistics

from absl import flags
import pytest

from experiments import side_by_side

TINY = ["--layers=2", "--width=4", "--inner_width=8", "--tau=2", "--modal_order=4"]


def _run(out, *argv: str) -> dict:
  fv = flags.FlagValues()
  side_by_side.define_flags(fv)
  fv(["runner", f"--out={out}", *argv])
  side_by_side.main([], fv)
  return json.loads(out.read_text())["side_by_side"]


@pytest.mark.parametrize("model, configs", [
    ("lm", "modal,flash,bare,flash:bfloat16"),
    ("stack", "flash,modal,bare,lazy,offline"),
])
def test_every_configuration_every_round(tmp_path, model, configs):
  out = tmp_path / "sbs.json"
  data = _run(out, *TINY, f"--model={model}", "--length=20", "--rounds=3",
              f"--configs={configs}")
  names = configs.split(",")
  assert data["configs"] == names
  assert set(data["seconds"]) == set(names)
  for name in names:
    runs = data["seconds"][name]
    assert len(runs) == 3 and all(s > 0 for s in runs)
    row = data["summary"][name]
    assert row["median_seconds"] == pytest.approx(statistics.median(runs))
    assert row["per_token_us"] == pytest.approx(statistics.median(runs) / 19 * 1e6)
    ratios = [a / b for a, b in zip(data["seconds"]["flash"], runs)]
    assert row["ratios_vs_reference"] == pytest.approx(ratios)
    for other in names:
      if other != name:
        want = statistics.median(a / b for a, b in zip(data["seconds"][other], runs))
        assert row["slower_by"][other] == pytest.approx(want)
  assert data["summary"]["flash"]["median_ratio_vs_reference"] == pytest.approx(1.0)
  with open(out.with_suffix(".csv")) as f:
    assert len(list(csv.DictReader(f))) == 3 * len(names)
  assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("argv, match", [
    (["--configs=flash,warp"], "unknown strategy 'warp'"),
    (["--configs=flash,flash:float16"], "step weights must be one of"),
    (["--model=stack", "--configs=flash:bfloat16"], "language model's strategies only"),
    (["--configs=bare:bfloat16,flash"], "language model's strategies only"),
    (["--configs=offline:bfloat16,flash"], "language model's strategies only"),
    (["--configs=flash,flash"], "distinct"),
    (["--configs=modal,bare"], "--reference 'flash' is not one of"),
    (["--rounds=0"], "--rounds must be >= 1"),
    (["--length=1"], "--length must be >= 2"),
])
def test_bad_flags_are_refused(tmp_path, argv, match):
  with pytest.raises(ValueError, match=match):
    _run(tmp_path / "x.json", *TINY, *argv)
