"""The result store: a JSON file of measured points keyed by their configuration, written after
every point (so an interrupted run resumes), set aside when it was measured on another machine;
and CSV tables beside it."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import logging

from experiments.lib import machine as machine_lib

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "results"


def key_of(**config) -> str:
  """The store key of a measured point: its configuration as canonical JSON."""
  return json.dumps(config, sort_keys=True, separators=(",", ":"))


class Store:
  """A JSON file {"machine": ..., "points": {key: value}, ...}; `run` skips finished keys.

  Written after every point (atomically), so an interrupted run keeps what it measured. A
  file measured on another machine (`machine.MACHINE_KEYS` differ) is renamed aside
  (`*.<time>.other-machine`) and a new one begun.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    here = machine_lib.machine()
    data = json.loads(self.path.read_text()) if self.path.exists() else {}
    old = data.get("machine", {})
    if data and any(old.get(k) != here.get(k) for k in machine_lib.MACHINE_KEYS):
      stamp = int(time.time())
      while (aside := self.path.with_name(f"{self.path.name}.{stamp}.other-machine")).exists():
        stamp += 1  # never overwrite an earlier set-aside store
      logging.warning("%s was measured on another machine (%s); moved to %s", self.path,
                      {k: old.get(k) for k in machine_lib.MACHINE_KEYS}, aside)
      self.path.rename(aside)
      data = {}
    data["machine"] = here
    data.setdefault("points", {})
    self.data = data

  @property
  def points(self) -> dict[str, Any]:
    return self.data["points"]

  def get(self, key: str):
    return self.points.get(key)

  def save(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
    os.replace(tmp, self.path)

  def put(self, key: str, value: Any) -> None:
    self.points[key] = value
    self.save()

  def set(self, name: str, value: Any) -> None:
    """A top-level entry (a summary, a fit) beside the points."""
    self.data[name] = value
    self.save()

  def run(self, key: str, measure: Callable[[], Any]):
    """The stored value of `key`, or `measure()` stored under it."""
    done = self.get(key)
    if done is not None:
      logging.info("skipped (measured before): %s", key)
      return done
    logging.info("measuring %s ...", key)
    start = time.perf_counter()
    value = measure()
    logging.info("done in %.1f s: %s -> %s", time.perf_counter() - start, key,
                 json.dumps(value)[:240])
    self.put(key, value)
    return value


def point(store: Store | None, config: dict[str, Any], measure: Callable[[], Any]):
  """`store.run` under the key of `config`, or just `measure()` without a store."""
  return store.run(key_of(**config), measure) if store else measure()


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
  """Rows of scalars as CSV (columns: the union of the rows' keys, in first-seen order)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
