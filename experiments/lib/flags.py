"""The absl flags the runners share, defined into any `FlagValues` (runners define theirs only
when run as scripts, so that importing several of them defines nothing twice)."""

from __future__ import annotations

from absl import flags

from experiments.lib.sampling import Sampling
from experiments.lib.workloads import Workload
from lcsm_jax.decoding.options import parse_tau


def _valid_tau(text: str) -> bool:
  try:
    parse_tau(text)
  except ValueError:
    return False
  return True


def define_tau_flag(flag_values, name: str = "tau") -> None:
  """--tau: a flash block implementation, parsed by `lcsm_jax.decoding.options.parse_tau`."""
  flags.DEFINE_string(name, "auto", "Flash block implementation: auto, direct, fft, pallas or "
                      "an integer crossover (direct blocks up to it).", flag_values=flag_values)
  flags.register_validator(name, _valid_tau, "tau must be auto, direct, fft, pallas or an "
                           "integer >= 0.", flag_values=flag_values)


def tau(f, name: str = "tau"):
  """The parsed value of a flag defined by `define_tau_flag`."""
  return parse_tau(getattr(f, name))


def define_model_flags(flag_values, model: str = "stack", layers: int = 8, width: int = 256,
                       batch: int = 1, repeats: int = 3, with_tau: bool = True) -> None:
  """--model, --layers, --width, --inner_width, --order, --batch, --tau (unless not
  `with_tau`), --repeats."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("model", model, ["stack", "lm"], "Mixing-only stack or the language model.",
                    **fv)
  flags.DEFINE_integer("layers", layers, "Layers M.", **fv)
  flags.DEFINE_integer("width", width, "Channels D (d_model of the language model).", **fv)
  flags.DEFINE_integer("inner_width", 1024, "MLP width d_inner of the language model.", **fv)
  flags.DEFINE_integer("order", 2, "Hyena order of the language model.", **fv)
  flags.DEFINE_integer("batch", batch, "Batch rows.", **fv)
  if with_tau:
    define_tau_flag(flag_values)
  flags.DEFINE_integer("repeats", repeats, "Timed runs (median reported) after one warm-up.",
                       **fv)


def workload_from_flags(f, max_length: int) -> Workload:
  return Workload(f.model, f.layers, f.width, f.batch, f.inner_width, f.order, max_length)


def define_sampling_flags(flag_values, recompute_above: int = 1024) -> None:
  """--sample_above, --sample_recompute_above, --eager_max, --sample_positions,
  --sample_steps, --recompute_sample_steps (see `sampling.Sampling`)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("sample_above", 8192, "Lazy is sampled above this L.", **fv)
  flags.DEFINE_integer("sample_recompute_above", recompute_above, "Recompute is sampled above "
                       "this L.", **fv)
  flags.DEFINE_integer("eager_max", 8192, "Eager is extrapolated from full runs above this L.",
                       **fv)
  flags.DEFINE_integer("sample_positions", 4, "Prompt lengths at which lazy is sampled.", **fv)
  flags.DEFINE_integer("sample_steps", 64, "Steps per lazy sample.", **fv)
  flags.DEFINE_integer("recompute_sample_steps", 4, "Steps per recompute sample.", **fv)


def sampling_from_flags(f) -> Sampling:
  return Sampling(lazy_above=f.sample_above, recompute_above=f.sample_recompute_above,
                  eager_max=f.eager_max, positions=f.sample_positions, steps=f.sample_steps,
                  recompute_steps=f.recompute_sample_steps)


def define_out_flag(flag_values, default, what: str = "JSON output; the CSV and PNG are "
                    "written beside it.") -> None:
  """--out: the runner's JSON (default `store.RESULTS_DIR / <name>.json`)."""
  flags.DEFINE_string("out", str(default), what, flag_values=flag_values)
