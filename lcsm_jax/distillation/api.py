"""`distill`: every long filter of a model fitted by a modal recurrence, with a report.

Per group of streams (one layer at a time for the Hyena language model, so that 10^6-tap filters
never exist for all layers at once), in blocks of `hankel.BLOCK` filters:

  taps (T, S', D) from the model's online adapter -> window and Hankel eigendecomposition
  (`hankel`) -> order (fixed, or per filter from tol) -> ERA poles and least-squares residues
  (`fit`) -> optional Adam refinement (`refine`) -> complex64 `ModalFilters` -> error metrics of
  the stored filters over all T taps (`report`).

Progress is logged per group (std `logging`, logger 'lcsm_jax.distillation').
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax.distillation import blas, fit, hankel, refine as refine_lib, report as report_lib
from lcsm_jax.distillation.modal import ModalFilters, to_stripedhyena
from lcsm_jax.models import online_model
from lcsm_jax.models.hyena.online import HyenaOnline

logger = logging.getLogger("lcsm_jax.distillation")


class DistillationWarning(UserWarning):
  """A fit worse than asked for: a tolerance not reached, or a large tap error."""


@dataclasses.dataclass(frozen=True)
class Distilled:
  """The result of `distill`.

  Attributes:
    filters: ModalFilters (S, D, N/2): poles, residues, h0 (the filters' tap 0).
    skip: (S, D) float32, the model's skip term (its diagonal minus h0), for
      `to_stripedhyena`.
    report: the report dict (`lcsm_jax.distillation.report`: settings, metrics, per_filter,
      per_stream, overall, timings_s), JSON-serialisable.
  """

  filters: ModalFilters
  skip: jax.Array
  report: dict[str, Any]

  @property
  def poles(self) -> jax.Array:
    return self.filters.poles

  @property
  def residues(self) -> jax.Array:
    return self.filters.residues

  @property
  def h0(self) -> jax.Array:
    return self.filters.h0

  @property
  def order(self) -> int:
    return self.filters.order

  def table(self) -> str:
    """The report as a printable table."""
    return report_lib.format_table(self.report)

  def to_stripedhyena(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(poles, residues_sh, D) in the StripedHyena convention (`modal.to_stripedhyena`)."""
    return to_stripedhyena(self.filters, self.skip)


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
  return int(value)


def _check_real(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r}.")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return float(value)


def _resolve_model(config_or_model: Any):
  if hasattr(config_or_model, "filters") and hasattr(config_or_model, "max_length"):
    return config_or_model
  return online_model(config_or_model)


def _stream_groups(model, params, length: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(first stream, taps (T, S', D) float32, diagonal (S', D) float32) per group of streams:
  one layer at a time for the Hyena LM (its adapter on a one-layer configuration, so 10^6-tap
  filters exist for one layer at a time), one stream at a time otherwise."""
  if isinstance(model, HyenaOnline):
    cfg = model.config
    one = HyenaOnline(cfg.replace(n_layer=1))
    per_layer = cfg.num_streams // cfg.n_layer
    blocks = params["params"]["stack"]["blocks"]
    filters = jax.jit(one.filters, static_argnums=1)
    for layer in range(cfg.n_layer):
      sub = {"params": {"stack": {"blocks": jax.tree.map(lambda x, i=layer: x[i:i + 1], blocks)}}}
      taps, diagonal = filters(sub, length)
      yield layer * per_layer, np.asarray(taps, np.float32), np.asarray(diagonal, np.float32)
      del taps, diagonal
    return
  taps, diagonal = model.filters(params, length)
  taps, diagonal = np.asarray(taps, np.float32), np.asarray(diagonal, np.float32)
  for stream in range(taps.shape[1]):
    yield stream, taps[:, stream:stream + 1], diagonal[stream:stream + 1]


def _streams_per_layer(model) -> int:
  if isinstance(model, HyenaOnline):
    return model.config.num_streams // model.config.n_layer
  return 1


# The stored (complex64) filters materialised in float64, so that the report measures them and
# not float32 rounding of powers near the unit circle (`ModalFilters.taps`).
_taps64 = jax.jit(lambda filters, length: filters.taps(length, jnp.float64), static_argnums=1)


def _block_fit(flat: np.ndarray, order: int | None, tol: float | None, max_order: int,
               max_hankel: int, energy_tol: float, max_modulus: float, refine_steps: int,
               learning_rate: float, timings: dict[str, float]) -> dict[str, np.ndarray]:
  """Fit filters flat (T, F): poles, residues (F, n) complex128 and per-filter figures."""
  tick = time.perf_counter()
  with blas.threads(1):
    win = hankel.window(flat, max_size=max_hankel, energy_tol=energy_tol)
    values, vectors = hankel.hankel_eigh(win.hankel, win.size)
    sv = np.abs(values)
    if order is not None:
      orders = np.full(flat.shape[1], order, np.int64)
      reached = np.ones(flat.shape[1], bool)
    else:
      orders, reached = hankel.select_order(sv, tol, max_order)
    slots = int(orders.max()) // 2
    poles, residues = fit.fit_window(win, values, vectors, orders, slots, max_modulus)
    del vectors
  timings["fit"] += time.perf_counter() - tick
  if refine_steps:
    tick = time.perf_counter()
    with blas.threads(1):
      poles, residues = refine_lib.refine(poles, residues, win, fit.used_slots(orders, slots),
                                          steps=refine_steps, learning_rate=learning_rate,
                                          max_modulus=max_modulus)
    timings["refine"] += time.perf_counter() - tick
  return {"poles": poles, "residues": residues, "order": orders, "reached": reached,
          "hankel_bound": hankel.hankel_bound(sv, orders),
          "hankel_ratio": hankel.ratio_at(sv, orders), "stride": win.hankel_stride,
          "window": win.effective}


# Filters per materialisation in the report: (T, 128) float64 is 1 GB at T = 10^6.
REPORT_BLOCK = 128


def _measure(flat: np.ndarray, poles: np.ndarray, residues: np.ndarray, h0: np.ndarray,
             length: int) -> dict[str, np.ndarray]:
  """Error metrics of the stored (complex64) filters against taps flat (T, F), in blocks."""
  poles = poles.reshape(-1, poles.shape[-1])
  residues = residues.reshape(poles.shape)
  parts = []
  for c in range(0, flat.shape[1], REPORT_BLOCK):
    block = ModalFilters(jnp.asarray(poles[None, c:c + REPORT_BLOCK], jnp.complex64),
                         jnp.asarray(residues[None, c:c + REPORT_BLOCK], jnp.complex64),
                         jnp.asarray(h0[None, c:c + REPORT_BLOCK], jnp.float32))
    with jax.enable_x64(True):
      approx = _taps64(block, length)[:, 0]
      parts.append(report_lib.error_metrics(flat[:, c:c + REPORT_BLOCK], approx))
    del approx
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _pad_slots(x: np.ndarray, slots: int) -> np.ndarray:
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, slots - x.shape[-1])])


def distill(params: Any, config_or_model: Any, order: int | None = None,
            tol: float | None = None, *, length: int | None = None, refine_steps: int = 0,
            learning_rate: float = 3e-2, max_order: int = 64, max_hankel: int = 256,
            energy_tol: float = 1e-12, max_modulus: float = 1 - 1e-6,
            warn_error: float = 0.1) -> Distilled:
  """Distil every long filter of a model into a modal recurrence of order N.

  Args:
    params: the model's parameters.
    config_or_model: a model configuration (`HyenaConfig`: its online adapter from
      `lcsm_jax.models.online_model`) or an online model object with `filters(params, T)` and
      `max_length` (e.g. `ConvStack`).
    order: N, the real states per filter (even, >= 2, at most the Hankel window size k =
      min(max_hankel, (length - 1) // 2)); or
    tol: choose N per filter, the smallest with sigma_{N+1} / sigma_1 < tol (0 < tol < 1), at
      most `max_order`; the stored N is the largest chosen, the rest padded with unused slots
      (pole 0, residue 0). Exactly one of order / tol.
    length: taps T to fit and measure (default and maximum: the model's max_length).
    refine_steps: Adam steps of joint pole/residue refinement (0: closed-form fit only).
    learning_rate: Adam's step size for the refinement.
    max_order: the cap on per-filter orders with tol.
    max_hankel: the largest Hankel size k (longer windows are box-summed, see `hankel`).
    energy_tol: the tail energy fraction of h[1:] left out of the window.
    max_modulus: poles are kept at |p| <= max_modulus < 1.
    warn_error: warn (`DistillationWarning`) when a filter's relative l2 tap error exceeds it.

  Returns:
    Distilled(filters (S, D, N/2), skip (S, D), report).
  """
  if (order is None) == (tol is None):
    raise ValueError(f"pass exactly one of order= or tol=, got order={order!r} and tol={tol!r}.")
  if order is not None:
    order = _check_int(order, "order", 2)
    if order % 2:
      raise ValueError(f"order must be even (N real states are N/2 conjugate pairs), got "
                       f"{order}.")
  else:
    tol = _check_real(tol, "tol")
    if not 0 < tol < 1:
      raise ValueError(f"tol must be in (0, 1), got {tol!r}.")
    max_order = _check_int(max_order, "max_order", 2)
    if max_order % 2:
      raise ValueError(f"max_order must be even, got {max_order}.")
  refine_steps = _check_int(refine_steps, "refine_steps", 0)
  learning_rate = _check_real(learning_rate, "learning_rate")
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
  max_hankel = _check_int(max_hankel, "max_hankel", 1)
  energy_tol = _check_real(energy_tol, "energy_tol")
  if not 0 <= energy_tol < 1:
    raise ValueError(f"energy_tol must be in [0, 1), got {energy_tol!r}.")
  max_modulus = _check_real(max_modulus, "max_modulus")
  if not 0 < max_modulus < 1:
    raise ValueError(f"max_modulus must be in (0, 1), got {max_modulus!r}.")
  warn_error = _check_real(warn_error, "warn_error")

  model = _resolve_model(config_or_model)
  max_length = int(model.max_length)
  length = max_length if length is None else _check_int(length, "length", 1)
  if length > max_length:
    raise ValueError(f"length {length} exceeds the model's max_length {max_length}.")
  if length < 3:
    raise ValueError(f"length must be >= 3 (tap 0 and at least 2 taps to fit), got {length}.")
  k = hankel.hankel_size(length, max_hankel)
  if order is not None and order > k:
    raise ValueError(f"order {order} is above what the taps support: {length} taps give a "
                     f"{k} x {k} Hankel window (k = min(max_hankel = {max_hankel}, "
                     f"(length - 1) // 2 = {(length - 1) // 2})), so N <= {k}.")
  check = getattr(model, "check_params", None)
  if check is not None:
    check(params)

  start = time.perf_counter()
  timings = {"filters": 0.0, "fit": 0.0, "refine": 0.0, "report": 0.0}
  pieces: list[dict[str, Any]] = []
  tick = time.perf_counter()
  for first, taps, diagonal in _stream_groups(model, params, length):
    timings["filters"] += time.perf_counter() - tick
    streams, width = taps.shape[1:]
    flat = np.ascontiguousarray(taps.reshape(length, streams * width))
    blocks = [_block_fit(flat[:, c:c + hankel.BLOCK], order, tol, max_order, max_hankel,
                         energy_tol, max_modulus, refine_steps, learning_rate, timings)
              for c in range(0, flat.shape[1], hankel.BLOCK)]
    slots = max(b["poles"].shape[1] for b in blocks)
    group = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]
             if key not in ("poles", "residues")}
    shape = (streams, width, slots)
    poles = np.concatenate([_pad_slots(b["poles"], slots) for b in blocks]).reshape(shape)
    residues = np.concatenate([_pad_slots(b["residues"], slots) for b in blocks]).reshape(shape)
    modal = ModalFilters(jnp.asarray(poles, jnp.complex64), jnp.asarray(residues, jnp.complex64),
                         jnp.asarray(taps[0], jnp.float32))
    tick = time.perf_counter()
    group.update(_measure(flat, poles, residues, np.asarray(taps[0]).reshape(-1), length))
    group["max_pole"] = np.abs(np.asarray(modal.poles)).max(axis=-1).reshape(-1).astype(float)
    timings["report"] += time.perf_counter() - tick
    pieces.append({"modal": modal, "skip": diagonal - taps[0],
                   "figures": {key: v.reshape(streams, width) for key, v in group.items()}})
    logger.info("streams %d..%d (%d taps): Hankel %d x %d, Hankel stride %d..%d, window %d..%d "
                "taps, order %d..%d, relative l2 tap error p50 %.3g max %.3g (%.1f s so far)",
                first, first + streams - 1, length, hankel.hankel_size(length, max_hankel),
                hankel.hankel_size(length, max_hankel), group["stride"].min(),
                group["stride"].max(), group["window"].min(), group["window"].max(),
                group["order"].min(), group["order"].max(), np.median(group["rel_l2"]),
                group["rel_l2"].max(), time.perf_counter() - start)
    del taps, flat
    tick = time.perf_counter()

  slots = max(int(p["modal"].poles.shape[-1]) for p in pieces)
  filters = ModalFilters(
      jnp.concatenate([jnp.asarray(_pad_slots(np.asarray(p["modal"].poles), slots))
                       for p in pieces]),
      jnp.concatenate([jnp.asarray(_pad_slots(np.asarray(p["modal"].residues), slots))
                       for p in pieces]),
      jnp.concatenate([p["modal"].h0 for p in pieces]))
  skip = jnp.asarray(np.concatenate([p["skip"] for p in pieces]), jnp.float32)
  figures = {key: np.concatenate([p["figures"][key] for p in pieces])
             for key in pieces[0]["figures"]}
  timings["total"] = time.perf_counter() - start
  settings = {
      "order": order, "tol": tol, "max_order": max_order if tol is not None else None,
      "length": length, "refine_steps": refine_steps, "learning_rate": learning_rate,
      "max_hankel": max_hankel, "hankel_size": k, "energy_tol": energy_tol,
      "max_modulus": max_modulus, "num_streams": filters.num_streams, "width": filters.width,
      "stored_order": filters.order, "model": type(model).__name__,
      "convention": "h[0] = h0 exact; h[t] = Re sum_n R_n p_n^(t-1) for t >= 1",
  }
  per_filter = {key: figures[key] for key in report_lib.METRICS if key in figures}
  rep = report_lib.build_report(per_filter, settings,
                                streams_per_layer=_streams_per_layer(model), timings=timings)
  _warn(figures, order, tol, max_order, warn_error)
  return Distilled(filters, skip, rep)


def _warn(figures: dict[str, np.ndarray], order, tol, max_order, warn_error: float) -> None:
  rel = figures["rel_l2"]
  total = rel.size
  if tol is not None and not figures["reached"].all():
    missed = ~figures["reached"]
    worst = np.unravel_index(np.argmax(np.where(missed, figures["hankel_ratio"], -1)), rel.shape)
    warnings.warn(
        f"tol={tol} not reached within max_order={max_order} for {int(missed.sum())} of "
        f"{total} filters: their Hankel spectrum decays too slowly (worst: stream {worst[0]}, "
        f"channel {worst[1]}, sigma_(N+1)/sigma_1 = {figures['hankel_ratio'][worst]:.3g} at N = "
        f"{int(figures['order'][worst])}, relative l2 tap error {rel[worst]:.3g}); the "
        f"achieved relative l2 tap error of those filters is up to {rel[missed].max():.3g}.",
        DistillationWarning, stacklevel=3)
  bad = rel > warn_error
  if bad.any():
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    what = f"order {order}" if order is not None else "the orders chosen for tol"
    warnings.warn(
        f"{int(bad.sum())} of {total} filters have relative l2 tap error above "
        f"warn_error={warn_error} at {what}: achieved error up to {rel[worst]:.3g} (stream "
        f"{worst[0]}, channel {worst[1]}, Hankel sigma_(N+1)/sigma_1 = "
        f"{figures['hankel_ratio'][worst]:.3g}: the spectrum does not decay), median "
        f"{np.median(rel):.3g}. See Distilled.report for every filter.",
        DistillationWarning, stacklevel=3)
