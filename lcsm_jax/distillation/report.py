"""How good a distillation is: per-filter metrics over all T taps, summarised per stream.

`error_metrics` measures the materialised modal filters (`ModalFilters.taps`, float32) against
the model's taps; the fit adds the Hankel figures and the order. `build_report` returns a plain
dict (JSON-serialisable: floats, ints, strings and nested lists) and `format_table` prints it.

Report keys:
  settings     the distillation's arguments and shapes (order / tol, length, S, D, N, ...).
  metrics      {name: description} for every per-filter metric (`METRICS`).
  per_filter   {name: (S, D) nested lists}.
  per_stream   [{'stream': s, 'layer': l, name: {'min', 'p50', 'p90', 'max'}}] over channels.
  overall      {name: {'min', 'p50', 'p90', 'max'}} over all filters.
  timings_s    seconds spent per phase ('filters', 'fit', 'refine', 'report', 'total').
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax.convolution import fft_length

METRICS: dict[str, str] = {
    "rel_l2": "||e[1:]||_2 / ||h[1:]||_2 over all T taps, e = modal taps - model taps "
              "(tap 0 is exact)",
    "l1": "sum_t |e[t]|: bounds the output error per unit input, |dy[t]| <= l1 * max |a|",
    "rel_l1": "l1 / sum_{t>=1} |h[t]|",
    "dft_max": "max over frequency of |DFT(e)| (n >= 2T points, zero-padded)",
    "rel_dft_max": "dft_max / max over frequency of |DFT(h)| (h with tap 0)",
    "max_pole": "max_n |p_n| over the filter's used slots",
    "hankel_bound": "2 * sum_{i>N} sigma_i of the window's Hankel (H-infinity error bound; an "
                    "estimate when the window is box-summed, stride > 1)",
    "hankel_ratio": "sigma_{N+1} / sigma_1 of the window's Hankel",
    "order": "N, the filter's real states (2 per used slot)",
    "stride": "taps per Hankel sample (1: the taps themselves)",
    "window": "n_eff, the taps h[1..n_eff] holding all but energy_tol of the energy",
}
QUANTILES = (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))
# Columns per jitted metrics call: FFTs of (n / 2 + 1) x 2 COLUMNS complex64, 540 MB at
# T = 10^6.
COLUMNS = 32


@functools.partial(jax.jit, static_argnames=("n",))
def _chunk_metrics(taps: jax.Array, approx: jax.Array, n: int) -> jax.Array:
  """(8, C) float64 for taps (T, C) and approx (T, C): ||e[1:]||, ||h[1:]||, sum |e|,
  sum_{t>=1} |h|, max |DFT(e)|, max |DFT(h)| (DFTs in float32, zero-padded to n)."""
  h = taps.astype(jnp.float64)
  e = approx.astype(jnp.float64) - h
  rows = [jnp.sqrt(jnp.sum(e[1:] ** 2, 0)), jnp.sqrt(jnp.sum(h[1:] ** 2, 0)),
          jnp.sum(jnp.abs(e), 0), jnp.sum(jnp.abs(h[1:]), 0)]
  both = jnp.concatenate([e, h], axis=1).astype(jnp.float32)
  spectra = jnp.max(jnp.abs(jnp.fft.rfft(both, n=n, axis=0)), axis=0).astype(jnp.float64)
  rows += [spectra[:e.shape[1]], spectra[e.shape[1]:]]
  return jnp.stack(rows)


def error_metrics(taps, approx) -> dict[str, np.ndarray]:
  """Tap-error metrics of (T, F) approximations against (T, F) taps (NumPy or JAX arrays).

  Sums run in float64 (under a local `jax.enable_x64`); the DFTs run in float32 on the float64
  difference rounded once (relative accuracy ~1e-6 of the error's own scale).
  """
  if np.shape(taps) != np.shape(approx) or len(np.shape(taps)) != 2:
    raise ValueError(f"taps {np.shape(taps)} and approx {np.shape(approx)} must both be (T, F).")
  num_taps, filters = np.shape(taps)
  n = fft_length(2 * num_taps)
  parts = []
  with jax.enable_x64(True):
    for c in range(0, filters, COLUMNS):
      parts.append(np.asarray(_chunk_metrics(jnp.asarray(taps[:, c:c + COLUMNS]),
                                             jnp.asarray(approx[:, c:c + COLUMNS]), n=n)))
  err, ref, l1, h1, dft, hdft = np.concatenate(parts, axis=1)

  def ratio(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

  return {"rel_l2": ratio(err, ref), "l1": l1, "rel_l1": ratio(l1, h1), "dft_max": dft,
          "rel_dft_max": ratio(dft, hdft)}


def _quantiles(values: np.ndarray) -> dict[str, float]:
  values = np.asarray(values, np.float64).ravel()
  return {name: float(np.quantile(values, q)) for name, q in QUANTILES}


def build_report(per_filter: dict[str, np.ndarray], settings: dict[str, Any], *,
                 streams_per_layer: int = 1, timings: dict[str, float] | None = None
                 ) -> dict[str, Any]:
  """The report dict (module docstring) from per-filter (S, D) arrays."""
  names = [name for name in METRICS if name in per_filter]
  shapes = {np.shape(per_filter[name]) for name in names}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"per-filter metrics must all be (S, D) arrays, got shapes {shapes}.")
  num_streams = next(iter(shapes))[0]
  per_stream = []
  for s in range(num_streams):
    row: dict[str, Any] = {"stream": s, "layer": s // streams_per_layer}
    row.update({name: _quantiles(per_filter[name][s]) for name in names})
    per_stream.append(row)
  ints = {"order", "stride", "window"}
  return {
      "settings": dict(settings),
      "metrics": {name: METRICS[name] for name in names},
      "per_filter": {name: (np.asarray(per_filter[name]).astype(int).tolist() if name in ints
                            else np.asarray(per_filter[name], np.float64).tolist())
                     for name in names},
      "per_stream": per_stream,
      "overall": {name: _quantiles(per_filter[name]) for name in names},
      "timings_s": {k: float(v) for k, v in (timings or {}).items()},
  }


TABLE_COLUMNS = ("rel_l2", "l1", "rel_dft_max", "max_pole", "hankel_bound", "hankel_ratio",
                 "order")


def format_table(report: dict[str, Any], columns=TABLE_COLUMNS) -> str:
  """A text table: one row per stream (and one for all), each cell 'p50 / p90 / max' over
  channels (for 'order' and 'max_pole': 'min..max')."""
  columns = [c for c in columns if c in report["overall"]]

  def cell(name, q):
    if name == "order":
      return f"{q['min']:.0f}..{q['max']:.0f}"
    if name == "max_pole":
      return f"{q['min']:.6f}..{q['max']:.6f}"
    return f"{q['p50']:.3g} / {q['p90']:.3g} / {q['max']:.3g}"

  header = ["stream", "layer"] + list(columns)
  rows = [[str(r["stream"]), str(r["layer"])] + [cell(c, r[c]) for c in columns]
          for r in report["per_stream"]]
  rows.append(["all", ""] + [cell(c, report["overall"][c]) for c in columns])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
  settings = report["settings"]
  what = (f"order {settings.get('order')}" if settings.get("order") is not None
          else f"tol {settings.get('tol')}")
  title = (f"distilled {settings.get('num_streams')} streams x {settings.get('width')} channels, "
           f"{settings.get('length')} taps, {what}, stored N = {settings.get('stored_order')} "
           f"(cells: p50 / p90 / max over channels)")
  return "\n".join([title] + lines)


def to_json(report: dict[str, Any], **kwargs) -> str:
  """The report as JSON text (it holds only JSON types)."""
  return json.dumps(report, **kwargs)
