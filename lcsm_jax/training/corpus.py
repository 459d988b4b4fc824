"""A byte corpus built from the Python standard library's own source files.

Every `*.py` file under `sysconfig.get_paths()['stdlib']` is read, in sorted order of its
relative path, skipping test directories and installed third-party packages. Files are split
into training and held-out sets BY FILE: a SHA-256 hash of the relative path decides, so the
split is deterministic, needs no random state, and a file never contributes to both sets.

The corpus differs slightly between Python versions (the standard library changes); record
`Corpus.python_version` with anything trained on it. Nothing is written anywhere unless a
`cache_dir` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import sysconfig

import numpy as np

# Directory names never descended into: test suites, third-party packages, bytecode caches.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
})
DEFAULT_HELDOUT_FRACTION = 0.05
_HASH_BUCKETS = 10_000


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Training and held-out bytes (uint8), the files each came from, and their provenance."""

  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  python_version: str
  root: str

  def describe(self) -> dict:
    return {
        "python_version": self.python_version,
        "stdlib": self.root,
        "train_files": len(self.train_files),
        "train_bytes": int(self.train.size),
        "validation_files": len(self.validation_files),
        "validation_bytes": int(self.validation.size),
    }


def stdlib_root() -> pathlib.Path:
  """The directory of this interpreter's standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | os.PathLike[str] | None = None) -> list[str]:
  """Relative POSIX paths of every `*.py` file under `root` (default: the stdlib), sorted,
  excluding any file inside a directory named in `EXCLUDED_DIRS`. Symlinks are not followed."""
  root = pathlib.Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"no source directory at {root}.")
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    rel_dir = pathlib.PurePath(dirpath).relative_to(root)
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if name.endswith(".py") and path.is_file() and not path.is_symlink():
        found.append((rel_dir / name).as_posix())
  return sorted(found)


def is_heldout(relative_path: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
  """Whether a file (by its relative POSIX path) belongs to the held-out set."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"held-out fraction must lie in [0, 1], got {fraction}.")
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % _HASH_BUCKETS < round(fraction * _HASH_BUCKETS)


def split_files(paths: list[str], fraction: float = DEFAULT_HELDOUT_FRACTION
                ) -> tuple[list[str], list[str]]:
  """(train, held-out) lists, each in the order of `paths`."""
  train, heldout = [], []
  for p in paths:
    (heldout if is_heldout(p, fraction) else train).append(p)
  return train, heldout


def _read(root: pathlib.Path, files: list[str]) -> np.ndarray:
  chunks = [(root / f).read_bytes() for f in files]
  return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


def build_corpus(root: str | os.PathLike[str] | None = None,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 cache_dir: str | os.PathLike[str] | None = None) -> Corpus:
  """Reads the corpus (the file bytes of each set concatenated in sorted order).

  Args:
    root: source directory; default the running interpreter's standard library.
    heldout_fraction: share of files (by path hash) held out for validation.
    cache_dir: if given, the arrays are cached there (keyed by a fingerprint of the Python
      version, file list and sizes, and the fraction); nothing is written elsewhere.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  files = list_source_files(root)
  if not files:
    raise ValueError(f"no *.py files under {root}.")
  train_files, val_files = split_files(files, heldout_fraction)
  version = platform.python_version()

  cache_path = None
  if cache_dir is not None:
    fingerprint = hashlib.sha256(json.dumps(
        [version, heldout_fraction, [(f, (root / f).stat().st_size) for f in files]]
    ).encode()).hexdigest()[:16]
    cache_path = pathlib.Path(cache_dir) / f"stdlib_corpus_{fingerprint}.npz"
    if cache_path.exists():
      with np.load(cache_path, allow_pickle=False) as data:
        return Corpus(data["train"], data["validation"], tuple(train_files), tuple(val_files),
                      version, str(root))

  corpus = Corpus(_read(root, train_files), _read(root, val_files), tuple(train_files),
                  tuple(val_files), version, str(root))
  if cache_path is not None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp.npz")
    np.savez(tmp, train=corpus.train, validation=corpus.validation)
    os.replace(tmp, cache_path)
  return corpus
