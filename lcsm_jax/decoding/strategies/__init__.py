"""The registry of decoding strategies: name -> implementation.

Adding a strategy is one module in this package (a frozen dataclass implementing
`decoding.interfaces.Strategy`, with a `from_options(options, crossover, pallas_max)` class
method, and `needs_crossover(options)` if it uses the machine's measured direct/FFT crossover)
and one line in `REGISTRY`.
"""

from __future__ import annotations

from typing import Any

from lcsm_jax.decoding.interfaces import Strategy
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies.eager import Eager
from lcsm_jax.decoding.strategies.flash import Flash
from lcsm_jax.decoding.strategies.lazy import Lazy
from lcsm_jax.decoding.strategies.modal import Modal
from lcsm_jax.decoding.strategies.recompute import Recompute

REGISTRY: dict[str, Any] = {
    "flash": Flash,
    "lazy": Lazy,
    "eager": Eager,
    "recompute": Recompute,
    "modal": Modal,  # approximate: the distilled recurrences of `lcsm_jax.distill`
}
STRATEGIES: tuple[str, ...] = tuple(REGISTRY)
EXACT_STRATEGIES: tuple[str, ...] = tuple(name for name, cls in REGISTRY.items() if cls.exact)


def strategy_class(name: str):
  """The implementation registered as `name`; ValueError listing the choices otherwise."""
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}.")
  return REGISTRY[name]


def create(name: str, options: EngineOptions | None = None, *, crossover: int | None = None,
           pallas_max: int | None = None) -> Strategy:
  """The strategy `name` configured by `options` (tau='auto' resolved by `crossover`)."""
  return strategy_class(name).from_options(options or EngineOptions(), crossover, pallas_max)


def needs_crossover(name: str, options: EngineOptions) -> bool:
  """Whether `create(name, options)` needs this machine's measured crossover (a strategy says
  so with a `needs_crossover(options)` class method; flash does for tau='auto')."""
  cls = strategy_class(name)
  return bool(getattr(cls, "needs_crossover", lambda options: False)(options))
