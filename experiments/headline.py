r"""The README's headline table, made from the `bench_generate` results so the two cannot drift.

  python -m experiments.headline            # prints the table
  python -m experiments.headline --write    # replaces it in README.md (between the markers)

Reads every `experiments/results/bench_generate_*.json` (one configuration each, as written by
`python -m experiments.bench_generate --model=... --length=... --out=...`) and makes one row
per configuration: offline forward, flash (total and per token), flash / offline, lazy, flash
vs lazy and flash vs recompute, marking sampled baselines. `tests/test_experiments.py` checks
that README.md holds exactly this table for the committed results.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable

from absl import app
from absl import flags

from experiments.lib import store as store_lib

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- headline table: made by `python -m experiments.headline --write` -->"
END = "<!-- end of headline table -->"
HEADER = ("| workload | L | offline forward | flash | flash / offline | lazy | flash vs lazy | "
          "flash vs recompute |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def result_files(directory: pathlib.Path = store_lib.RESULTS_DIR) -> list[pathlib.Path]:
  return sorted(directory.glob("bench_generate_*.json"))


def seconds(x: float) -> str:
  """3 significant digits, whole seconds from 1000 up: 0.151 s, 94.1 s, 1557 s."""
  return f"{x:.0f} s" if x >= 999.5 else f"{x:.3g} s"


def per_token(x: float) -> str:
  return f"{x * 1e3:.3g} ms/token" if x >= 1e-3 else f"{x * 1e6:.3g} us/token"


def ratio(x: float) -> str:
  return f"{x:.0f}x" if x >= 999.5 else f"{x:.3g}x"


def workload(config: dict[str, Any]) -> str:
  if config["model"] == "stack":
    return f"mixing-only stack, {config['layers']} layers x {config['width']} channels"
  return (f"Hyena LM, d_model {config['width']}, {config['layers']} layers, "
          f"d_inner {config['inner_width']}")


def row(result: dict[str, Any], first_of_workload: bool) -> str:
  """One configuration's row; `result` is a value of a bench_generate JSON's "results"."""
  config, runs = result["config"], result["strategies"]
  if "flash" not in runs:
    raise ValueError(f"no flash measurement for {config}")
  flash, offline = runs["flash"], result["offline_forward"]["seconds"]
  cells = [workload(config) if first_of_workload else "same", str(config["length"]),
           seconds(offline),
           f"{seconds(flash['total_seconds'])} ({per_token(flash['per_token_seconds'])})",
           ratio(flash["total_seconds"] / offline)]
  if "lazy" in runs:
    lazy = runs["lazy"]
    sampled = " (sampled)" if lazy["method"] != "full" else ""
    cells += [seconds(lazy["total_seconds"]) + sampled,
              f"**{ratio(lazy['total_seconds'] / flash['total_seconds'])}**"]
  else:
    cells += ["", ""]
  if "recompute" in runs:
    recompute = runs["recompute"]
    how = f", {recompute['method']}" if recompute["method"] != "full" else ""
    cells.append(f"{ratio(recompute['total_seconds'] / flash['total_seconds'])} "
                 f"(recompute {seconds(recompute['total_seconds'])}{how})")
  else:
    cells.append("")
  return "| " + " | ".join(cells) + " |"


def table(paths: Iterable[pathlib.Path]) -> str:
  """The markdown table of every configuration in `paths`, grouped by workload, by L."""
  results = []
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    if not data.get("results"):
      raise ValueError(f"{path} has no finished configuration (is its run still going?).")
    results += data["results"].values()
  order = {"stack": 0, "lm": 1}
  results.sort(key=lambda r: (order.get(r["config"]["model"], 2), workload(r["config"]),
                              r["config"]["length"]))
  rows, previous = [], None
  for result in results:
    name = workload(result["config"])
    rows.append(row(result, name != previous))
    previous = name
  return "\n".join([HEADER] + rows)


def machines(paths: Iterable[pathlib.Path]) -> set[str]:
  """The distinct CPU models the results were measured on."""
  return {json.loads(pathlib.Path(p).read_text())["machine"].get("cpu_model", "unrecorded")
          for p in paths}


def replace_in(text: str, new_table: str) -> str:
  """`text` with the block between BEGIN and END replaced by `new_table`."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"README.md has no headline table markers ({BEGIN!r} ... {END!r}).")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{new_table}\n{END}{tail}"


def readme_table(text: str) -> str:
  """The table currently between the README's markers."""
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_bool("write", False, "Replace the table in README.md instead of printing it.",
                    flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  paths = result_files()
  new_table = table(paths)
  if flag_values.write:
    README.write_text(replace_in(README.read_text("utf-8"), new_table), "utf-8")
    print(f"updated {README} from {len(paths)} result files "
          f"(measured on: {', '.join(sorted(machines(paths)))})")
  else:
    print(new_table)


if __name__ == "__main__":
  define_flags()
  app.run(main)
