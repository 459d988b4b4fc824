"""Figures: pyplot on the non-interactive Agg backend, saving, log-log axes against L, and the
(JSON, CSV, PNG) paths of a runner's outputs."""

from __future__ import annotations

import os
import pathlib


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str | os.PathLike) -> None:
  """Lays out `fig`, writes it to `path` (120 dpi) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


def log_length_axes(ax, ylabel: str) -> None:
  """Log-log axes of a quantity against the sequence length L (powers of two), with a grid."""
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length L")
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.3)


def log2_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
  """Log-log axes with x in powers of two, labels, a small title, a grid and a legend."""
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)


def output_paths(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(JSON, CSV, PNG) paths of a runner whose --out is `out` (the JSON)."""
  out = pathlib.Path(out)
  return out, out.with_suffix(".csv"), out.with_suffix(".png")
