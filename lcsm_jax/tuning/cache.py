"""Measurements of this machine kept in JSON files, one dict of entries per file, under
`$LCSM_JAX_CACHE_DIR` (default `~/.cache/lcsm_jax`)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Callable

log = logging.getLogger("lcsm_jax")


def directory() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LCSM_JAX_CACHE_DIR",
                                     pathlib.Path.home() / ".cache" / "lcsm_jax"))


def read(path: pathlib.Path) -> dict:
  """The entries of the cache file at `path` ({} when missing or malformed)."""
  try:
    entries = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  return entries if isinstance(entries, dict) else {}


def store(path: pathlib.Path, key: str, value: Any) -> None:
  """Adds `key: value` to the cache file at `path`, written atomically (a temporary file
  renamed into place); OSError when it cannot be written."""
  entries = read(path)
  entries[key] = value
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    json.dump(entries, f, indent=2, sort_keys=True)
  os.replace(f.name, path)


def measured(path: pathlib.Path, key: str, measure: Callable[[], dict], what: str) -> dict:
  """The entry `key` of the cache at `path`, or `measure()` run now (announced in the log as
  measuring `what`) and stored (where the cache cannot be written, as in a read-only home,
  the measurement is still returned)."""
  entry = read(path).get(key)
  if entry is None:
    log.warning("measuring %s on this machine (once; cached in %s)", what, path)
    entry = measure()
    try:
      store(path, key, entry)
    except OSError:
      pass
  return entry
