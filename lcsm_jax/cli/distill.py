"""`lcsm-distill`: distil every long filter of a model into modal recurrences and save the model
with them.

  lcsm-distill --order 16 --out byte_lm_distilled
  lcsm-distill --checkpoint path/to/hyenadna --tol 1e-3 --out hyenadna_distilled
  lcsm-generate --checkpoint byte_lm_distilled --num_tokens 300 --compare_exact

`lcsm_jax.distill` fits every filter (per layer, stream and channel); its progress (one line per
layer, the logger 'lcsm_jax.distillation') and any `DistillationWarning` (a fit worse than
asked for) go to stderr as one-line messages, the summary table (`Distilled.table()`) and the
timings to stdout. The model is then saved in the project's own format with its distilled
section (`io.native.save_params(..., distilled=...)`): a new directory appears whole (written
under a temporary name beside it, then renamed), and a directory that already holds files is
refused unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from typing import Any, Iterator, Sequence, TextIO

import lcsm_jax
from lcsm_jax.cli import common
from lcsm_jax.distillation import DistillationWarning
from lcsm_jax.io import load_checkpoint, save_params
from lcsm_jax.io.hyenadna import WEIGHT_FILES
from lcsm_jax.io.native import OWN_WEIGHTS

PROG = "lcsm-distill"
DISTILL_LOGGER = "lcsm_jax.distillation"


# -- argparse value types. -------------------------------------------------------------------------

def even_order(value: str) -> int:
  """An argparse type: an even integer >= 2 (N real states are N/2 conjugate pole pairs)."""
  number = common.int_at_least(2)(value)
  if number % 2:
    raise argparse.ArgumentTypeError(
        f"must be even (N real states are N/2 complex-conjugate pole pairs), got {number}")
  return number


def tolerance(value: str) -> float:
  """An argparse type: a number in (0, 1), the Hankel singular-value ratio to reach."""
  try:
    number = common.float_in(0.0, 1.0, True)(value)
  except argparse.ArgumentTypeError as e:
    if "must lie in" not in str(e):  # not a number, or not finite: argparse's message as is
      raise
    number = None
  if number is None or number >= 1:
    raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value}")
  return number


# -- The output directory. -------------------------------------------------------------------------

def check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Raises FileExistsError unless `out` can receive the checkpoint: a new path or an empty
  directory, or with `overwrite` a directory holding files, unless they are a checkpoint of
  another format (HyenaDNA weights, or a config.json without params.safetensors), which
  saving there would leave beside a config.json that no longer fits them."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} is a file, not a directory.")
  if not out.is_dir() or not any(out.iterdir()):
    return
  if not overwrite:
    held = sorted(p.name for p in out.iterdir())
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise FileExistsError(f"--out {out} already exists and is not empty ({shown}); pass "
                          "--overwrite to replace the checkpoint in it, or choose another "
                          "directory.")
  foreign = [name for name in WEIGHT_FILES if (out / name).exists()]
  if (out / "config.json").exists() and not (out / OWN_WEIGHTS).exists():
    foreign.append("config.json")
  if foreign:
    raise FileExistsError(f"--out {out} holds a checkpoint of another format "
                          f"({', '.join(foreign)}); lcsm-distill replaces only directories "
                          "of its own format. Choose another directory.")


def save_checkpoint(out: pathlib.Path, config, params: Any, distilled: Any,
                    overwrite: bool) -> None:
  """Saves the model with its distilled section into directory `out`.

  A new (or empty) `out` is written as a temporary directory beside it and renamed into place,
  so it appears whole or not at all. An existing directory (`overwrite`) is saved into by
  `save_params`, whose files are each replaced atomically (the distilled section is bound to
  the weights by their SHA-256, so a reader never takes one save's filters for another's
  weights).
  """
  check_out(out, overwrite)
  if out.is_dir() and any(out.iterdir()):
    save_params(out, config, params, distilled=distilled)
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.distilling-"))
  try:
    save_params(tmp, config, params, distilled=distilled)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it a new directory's mode
    try:
      os.rename(tmp, out)  # replaces an empty directory; fails if one appeared meanwhile
    except OSError:
      raise FileExistsError(f"--out {out} appeared (not empty) while distilling; nothing was "
                            "written there.") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# -- Progress and warnings on stderr. --------------------------------------------------------------

@contextlib.contextmanager
def progress_to(err: TextIO) -> Iterator[None]:
  """While active, the distillation's progress (logger 'lcsm_jax.distillation', INFO) goes to
  `err` as lines `lcsm-distill: ...`."""
  logger = logging.getLogger(DISTILL_LOGGER)
  handler = logging.StreamHandler(err)
  handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
  level, propagate = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False  # not twice, where the root logger prints too
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


@contextlib.contextmanager
def warnings_as_lines(err: TextIO) -> Iterator[None]:
  """While active, warnings are printed on `err` as one line each, `lcsm-distill: warning:
  ...` (the category named unless a `DistillationWarning`), without a source line."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", DistillationWarning)
    try:
      yield
    finally:
      for w in caught:
        kind = "" if issubclass(w.category, DistillationWarning) else f"{w.category.__name__}: "
        message = " ".join(str(w.message).split())
        print(f"{PROG}: warning: {kind}{message}", file=err, flush=True)


# -- The command. ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description="Distil every long filter of a Hyena language model into a modal "
      "(diagonal state-space) recurrence of order N, print the tap errors, and save the model "
      "with its distilled filters; lcsm-generate --checkpoint OUT then samples with the "
      "constant-memory 'modal' strategy.")
  parser.add_argument("--checkpoint", metavar="PATH", default=None,
                      help="HyenaDNA checkpoint, or a directory written by "
                      "lcsm_jax.save_params (as lcsm-generate takes). Default: the shipped "
                      "byte-level LM.")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--order", type=even_order, default=None,
                     help="N, the real states per filter: an even integer >= 2 (N/2 pole "
                     "pairs), the same for every filter.")
  which.add_argument("--tol", type=tolerance, default=None,
                     help="Choose N per filter: the smallest with Hankel singular values "
                     "sigma_(N+1) / sigma_1 < tol, in (0, 1), at most --max_order.")
  parser.add_argument("--out", metavar="DIR", required=True,
                      help="Directory to save the model and its distilled filters into (the "
                      "project's own format: config.json, params.safetensors, "
                      "distilled.safetensors).")
  parser.add_argument("--overwrite", action="store_true",
                      help="Save into --out even when it already holds files (replacing the "
                      "checkpoint there).")
  parser.add_argument("--refine_steps", type=common.int_at_least(0), default=0,
                      help="Adam steps refining poles and residues jointly after the "
                      "closed-form fit (0: none).")
  parser.add_argument("--learning_rate", type=common.float_in(0.0, float("inf"), True),
                      default=3e-2, help="Adam's step size for --refine_steps.")
  parser.add_argument("--max_order", type=even_order, default=64,
                      help="With --tol: the largest N a filter may get.")
  parser.add_argument("--length", type=common.int_at_least(3), default=None,
                      help="Taps to fit and measure (default and maximum: the model's l_max).")
  parser.add_argument("--warn_error", type=common.float_in(0.0, float("inf"), True),
                      default=0.1, help="Warn when a filter's relative l2 tap error exceeds "
                      "this.")
  return parser


def format_timings(timings: dict[str, float]) -> str:
  """One line: seconds per distillation phase (`Distilled.report['timings_s']`)."""
  parts = [f"{name} {timings[name]:.1f} s" for name in ("filters", "fit", "refine", "report")
           if name in timings]
  return f"time: {timings.get('total', 0.0):.1f} s ({', '.join(parts)})"


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
  """Loads the model, distils it with progress on `err`, prints the table to `out` and saves
  the model with its distilled filters. Returns the exit code."""
  target = pathlib.Path(args.out)
  check_out(target, args.overwrite)  # before the work, not after it
  config, params, description = load_checkpoint(args.checkpoint)
  what = f"order {args.order}" if args.order is not None else f"tol {args.tol:g}"
  print(f"{PROG}: {description} ({config.n_layer} layers, {config.num_streams} long-filter "
        f"streams x {config.d_model} channels, l_max {config.l_max}); distilling at {what}",
        file=err, flush=True)
  began = time.perf_counter()
  with progress_to(err), warnings_as_lines(err):
    distilled = lcsm_jax.distill(params, config, order=args.order, tol=args.tol,
                                 length=args.length, refine_steps=args.refine_steps,
                                 learning_rate=args.learning_rate, max_order=args.max_order,
                                 warn_error=args.warn_error)
  elapsed = time.perf_counter() - began
  out.write(distilled.table() + "\n")
  out.write(format_timings(distilled.report.get("timings_s", {"total": elapsed})) + "\n")
  out.flush()
  save_checkpoint(target, config, params, distilled, args.overwrite)
  print(f"{PROG}: saved the model with its distilled filters (stored N = {distilled.order}) to "
        f"{target}; sample from it with lcsm-generate --checkpoint {target}", file=err,
        flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `lcsm-distill`; `argv` without the program name (default sys.argv[1:]).

  Returns the exit code:
    0: success (a `DistillationWarning`, printed as a line, does not change it).
    2: bad usage or input: argparse's usage and error (both or neither of --order / --tol, an
      odd order, a tolerance outside (0, 1), ...), or one line `lcsm-distill: error: ...` on
      stderr, no traceback (a missing checkpoint, --out a file or a non-empty directory
      without --overwrite, an order above what the taps support). --out is checked before
      the distillation starts.
    130 (128 + SIGINT): interrupted (Ctrl-C); a new --out does not appear (the checkpoint is
      written under a temporary name first; interrupted while saving, a directory
      `.OUT.distilling-*` beside it may be left).
    141 (128 + SIGPIPE): the reader of stdout went away.
  """
  return common.run_main(PROG, build_parser(), run, argv)
