"""Distilled filters on disk: the distilled section of the project's own format, and the
StripedHyena per-block files.

Own format: `distilled.safetensors` beside `config.json` and `params.safetensors` (written by
`native.save_params(..., distilled=...)`), holding the poles and residues (S, D, N/2) as real
and imaginary float32 planes, h0 and the model's skip term (S, D), and in its metadata the
SHA-256 of the config.json and of the params.safetensors it was fitted from (a distilled
section of other weights is refused by `load_distilled`) and the report's summary (JSON).

StripedHyena (togethercomputer/stripedhyena, `load_poles_residues`): per long-convolution
stream k = 1..S, `approx_poles_{k}.npy` and `approx_residues_{k}.npy`, complex64 of shape
(N/2, D) in its convention h[t] = Re sum R p^t (t >= 0), and `approx_skip_{k}.npy` (D,) float32,
its separate skip term D (`distill.modal.to_stripedhyena` gives the algebra). StripedHyena loads
`.pt` files: `torch.save(torch.from_numpy(np.load(f)), f.replace('.npy', '.pt'))` converts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from lcsm_jax.distillation.api import Distilled
from lcsm_jax.distillation.modal import ModalFilters, from_stripedhyena, to_stripedhyena
from lcsm_jax.errors import CheckpointError

PathLike = str | os.PathLike[str]

DISTILLED_FILE = "distilled.safetensors"
CONFIG_SHA256 = "lcsm_jax.config_sha256"
PARAMS_SHA256 = "lcsm_jax.params_sha256"
REPORT = "lcsm_jax.distill_report"
_REPORT_KEYS = ("settings", "overall", "per_stream", "timings_s")


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def _planes(x) -> np.ndarray:
  x = np.asarray(x).astype(np.complex64)
  return np.ascontiguousarray(np.stack([x.real, x.imag], axis=-1).astype(np.float32))


def write(target: pathlib.Path, distilled: Distilled, *, config_sha256: str,
          params_sha256: str) -> None:
  """Writes the distilled section to file `target` (the caller renames it into place)."""
  from safetensors.numpy import save_file
  report = {k: distilled.report[k] for k in _REPORT_KEYS if k in distilled.report}
  arrays = {"poles": _planes(distilled.filters.poles),
            "residues": _planes(distilled.filters.residues),
            "h0": np.ascontiguousarray(np.asarray(distilled.filters.h0, np.float32)),
            "skip": np.ascontiguousarray(np.asarray(distilled.skip, np.float32))}
  metadata = {CONFIG_SHA256: config_sha256, PARAMS_SHA256: params_sha256,
              REPORT: json.dumps(report, default=float)}
  save_file(arrays, str(target), metadata=metadata)


def read(path: PathLike, *, num_streams: int, width: int, config_sha256: str,
         params_sha256: str) -> Distilled:
  """Reads `path/distilled.safetensors`, checking it against the model's shapes and the
  checkpoint's files.

  Raises:
    CheckpointError: unreadable, missing arrays, shapes that do not fit (S, D) =
      (num_streams, width) (named), or fitted from another config.json or params.safetensors.
  """
  from safetensors import safe_open
  target = pathlib.Path(path) / DISTILLED_FILE
  try:
    with safe_open(str(target), framework="np") as f:
      metadata = dict(f.metadata() or {})
      arrays = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise CheckpointError(f"{target}: not a readable safetensors file ({e}).") from None
  for key, want, what in ((CONFIG_SHA256, config_sha256, "config.json"),
                          (PARAMS_SHA256, params_sha256, "params.safetensors")):
    if metadata.get(key) != want:
      raise CheckpointError(
          f"{target} was distilled from another model: its recorded {what} SHA-256 "
          f"({str(metadata.get(key))[:16]}...) differs from this directory's ({want[:16]}...). "
          "Distil the model again (lcsm-distill).")
  missing = sorted({"poles", "residues", "h0", "skip"} - set(arrays))
  if missing:
    raise CheckpointError(f"{target} lacks the arrays {missing}.")
  slots = arrays["poles"].shape[2] if arrays["poles"].ndim == 4 else None
  want = {"poles": (num_streams, width, slots, 2), "residues": (num_streams, width, slots, 2),
          "h0": (num_streams, width), "skip": (num_streams, width)}
  problems = [f"{k} has shape {tuple(arrays[k].shape)}, the model needs {want[k]}"
              for k in want if tuple(arrays[k].shape) != want[k]]
  if problems:
    raise CheckpointError(f"{target} does not fit the model (S, D) = ({num_streams}, {width}): "
                          + "; ".join(problems) + ".")
  as_complex = lambda x: (x[..., 0] + 1j * x[..., 1]).astype(np.complex64)
  filters = ModalFilters(as_complex(arrays["poles"]), as_complex(arrays["residues"]),
                         arrays["h0"].astype(np.float32))
  return Distilled(filters, arrays["skip"].astype(np.float32),
                   json.loads(metadata.get(REPORT, "{}")))


def export_stripedhyena(directory: PathLike, distilled: Distilled) -> list[pathlib.Path]:
  """Writes the StripedHyena per-stream files (see the module docstring) into `directory`;
  returns their paths."""
  poles, residues_sh, skip_d = to_stripedhyena(distilled.filters, distilled.skip)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for k in range(poles.shape[0]):
    for name, value in ((f"approx_poles_{k + 1}.npy", poles[k].T),
                        (f"approx_residues_{k + 1}.npy", residues_sh[k].T),
                        (f"approx_skip_{k + 1}.npy", skip_d[k])):
      target = directory / name
      tmp = target.with_name(f".{name}.tmp")
      with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(value))
      os.replace(tmp, target)
      written.append(target)
  return written


def import_stripedhyena(directory: PathLike, skip: Any) -> ModalFilters:
  """Reads the files `export_stripedhyena` writes (S = skip.shape[0] streams).

  Args:
    directory: holds approx_poles_{k}.npy, approx_residues_{k}.npy, approx_skip_{k}.npy.
    skip: (S, D) the model's skip term (its diagonal minus tap 0).
  """
  directory = pathlib.Path(directory)
  skip = np.asarray(skip, np.float32)
  poles, residues, d = [], [], []
  for k in range(1, skip.shape[0] + 1):
    try:
      poles.append(np.load(directory / f"approx_poles_{k}.npy").T)
      residues.append(np.load(directory / f"approx_residues_{k}.npy").T)
      d.append(np.load(directory / f"approx_skip_{k}.npy"))
    except OSError as e:
      raise CheckpointError(f"{directory}: StripedHyena files of stream {k} missing or "
                            f"unreadable ({e}).") from None
  try:
    return from_stripedhyena(np.stack(poles), np.stack(residues), np.stack(d), skip)
  except ValueError as e:
    raise CheckpointError(f"{directory}: {e}") from None
