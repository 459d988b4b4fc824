"""Laughing Hyena distillation: every long filter fitted by a modal (diagonal) recurrence.

  h[0] = h0 (exact);  h[t] ~ Re sum_n R_n p_n^(t-1) for t >= 1, |p_n| < 1, N/2 slots.

Modules: `modal` (ModalFilters, the StripedHyena conversion), `hankel` (windows, Hankel singular
values, order selection, the bound), `fit` (ERA poles, least-squares residues), `refine` (optax
refinement), `report` (metrics, summary, table), `api` (`distill`), `blas` (OpenBLAS held to
one thread during the fit's small batched decompositions).
"""

from lcsm_jax.distillation.api import Distilled, DistillationWarning, distill
from lcsm_jax.distillation.hankel import hankel_bound, hankel_singular_values, select_order
from lcsm_jax.distillation.modal import ModalFilters, from_stripedhyena, to_stripedhyena
from lcsm_jax.distillation.report import METRICS, format_table

__all__ = ["Distilled", "DistillationWarning", "METRICS", "ModalFilters", "distill",
           "format_table", "from_stripedhyena", "hankel_bound", "hankel_singular_values",
           "select_order", "to_stripedhyena"]
