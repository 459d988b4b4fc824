"""Model families; each has an online adapter for the decoding engine
(`models.interface.OnlineModel`), found from its configuration by `online_model`.

Adding a model family: its package under `models/`, an adapter class implementing
`interface.LanguageModel` (or `OnlineModel` for vector models), and one entry in `ADAPTERS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.online import HyenaOnline
from lcsm_jax.models.interface import LanguageModel

# configuration class -> the adapter that drives models of that configuration online
ADAPTERS: dict[type, type] = {
    HyenaConfig: HyenaOnline,
}


def online_model(config: Any, **options: Any) -> LanguageModel:
  """The online adapter of the model that `config` describes; `options`: the adapter's
  fields (e.g. `step_weights` of `HyenaOnline`). An option the family does not have is a
  TypeError naming it."""
  for config_type, adapter in ADAPTERS.items():
    if isinstance(config, config_type):
      fields = {f.name for f in dataclasses.fields(adapter)} - {"config"}
      unknown = sorted(set(options) - fields)
      if unknown:
        raise TypeError(f"the {adapter.__name__} adapter has no option {', '.join(unknown)} "
                        f"(its options: {', '.join(sorted(fields)) or 'none'}).")
      return adapter(config, **options)
  known = ", ".join(t.__name__ for t in ADAPTERS)
  raise TypeError(f"config must be the configuration of a known model family ({known}), got "
                  f"{type(config).__name__}.")
