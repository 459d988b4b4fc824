"""Options of the decoding engine that do not change its results, and the one parser of `tau`."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax

from lcsm_jax.decoding import blocks
from lcsm_jax.decoding.schedule import BASES

TAU_NAMES = ("auto",) + blocks.IMPLEMENTATIONS
GROUP_BYTES = 1 << 27  # flash blocks whose input window is larger run in groups
SMOOTH_AUTO = 64  # smooth='auto', where it smooths: the levels above 64 positions


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Choices of the engine that do not change its results.

  Attributes:
    tau: flash block implementation: 'auto' (direct up to the crossover measured on this
      machine, FFT above; resolved by the `Decoder` when it first sees a batch size, see
      `lcsm_jax.tuning.engine_tau`), 'direct',
      'fft', 'pallas', an int crossover (direct for block sizes <= tau) or a mapping
      {block size: method}.
    base: flash's tiling base b (2, 4, 8 or 16): blocks of b^k positions in groups of b,
      each input block transformed once and its spectrum reused for every later block of its
      group (2: the paper's binary tiling; 4, the default, was fastest on this machine:
      WORKSPACE.md). Larger bases have fewer levels, at the cost of (b - 1) filter-window
      spectra per level and the input blocks' spectra in the state (see the README's
      memory table).
    layer_parallel: flash runs the blocks of all layers as one batched call (False: one call
      per stream, for ablation).
    precomputed_spectra: flash FFT blocks use filter spectra computed once per model (False:
      transform the filter slice in every block, for ablation).
    spectra_max_size: spectra are precomputed up to this block size (None: all; 'auto':
      2^15 with base 2, all with larger bases). The few larger blocks of a long binary
      generation transform their filter slice themselves, which keeps the tables near the
      size of the filters (all sizes would cost twice the filters' bytes); with base b, a
      level reuses each filter window in b(b - 1)/2 squares per group, so every level keeps
      its spectra.
    smooth: flash spreads the work of every FFT level larger than `smooth` positions (True:
      16) over the steps before its outputs are due (`schedule.smoothed_events`), so that no
      token waits for a whole large block: those levels cover the pairs at least two blocks
      apart, the bridge level below them also the pairs next to the diagonal. Costs more
      transforms and products in all (see the README's latency section) and rings of twice
      the positions. False: the plain tiling. 'auto' (the default): SMOOTH_AUTO where the
      process runs XLA:CPU with its concurrency-optimized scheduler off (XLA_FLAGS, as
      `lcsm-generate` does; `lcsm_jax.tuning.scheduler`), where the smoothed schedule met its
      targets (max token latency <= 10x the median, total within 1.2x of the plain one);
      False otherwise (with the scheduler on, the smoothed total was 1.12-1.35x). Decided
      by `resolved()`, which sessions and strategies call when they are made.
    group_bytes: flash blocks whose input window exceeds this many bytes run in groups of one
      stream and part of the channels, bounding their FFT temporaries.
    chunk: positions per inner iteration of the lazy and eager strategies (a power of two).
    check_memory: estimate a run's memory (XLA's analysis of the compiled programs, plus
      parameters, tables and state) before it starts and refuse it with a ValueError naming
      the estimate when it exceeds the device's (on CPU, the host's) available memory.
  """

  tau: str | int | Mapping[int, str] = "auto"
  base: int = 4
  layer_parallel: bool = True
  precomputed_spectra: bool = True
  spectra_max_size: int | None | str = "auto"
  smooth: bool | int | str = "auto"
  group_bytes: int = GROUP_BYTES
  chunk: int = 256
  check_memory: bool = True

  def __post_init__(self):
    object.__setattr__(self, "tau", check_tau(self.tau))
    if (not isinstance(self.base, int) or isinstance(self.base, bool)
        or self.base not in BASES):
      raise ValueError(f"base must be one of {BASES} (flash's tiling base), got {self.base!r}.")
    for name in ("chunk", "group_bytes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if self.chunk < 1 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk must be a power of two >= 1, got {self.chunk}.")
    if self.spectra_max_size is not None and self.spectra_max_size != "auto" and (
        isinstance(self.spectra_max_size, bool) or not isinstance(self.spectra_max_size, int)
        or self.spectra_max_size < 1):
      raise ValueError(f"spectra_max_size must be an integer >= 1, 'auto' or None, got "
                       f"{self.spectra_max_size!r}.")
    if self.group_bytes < 0:
      raise ValueError(f"group_bytes must be >= 0, got {self.group_bytes}.")
    smooth = self.smooth
    if not (smooth == "auto" if isinstance(smooth, str) else
            isinstance(smooth, bool) or (isinstance(smooth, int) and smooth >= 1)):
      raise ValueError(f"smooth must be 'auto', True, False or a block size >= 1 (the levels "
                       f"above it are smoothed), got {smooth!r}.")
    for name in ("layer_parallel", "precomputed_spectra", "check_memory"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")

  def resolved(self) -> "EngineOptions":
    """These options with smooth='auto' decided for this process (see `smooth`); the same
    options when nothing is 'auto'."""
    if self.smooth != "auto":
      return self
    return dataclasses.replace(self, smooth=SMOOTH_AUTO if smoothing_preferred() else False)

  @classmethod
  def create(cls, options: "EngineOptions | None" = None, **overrides) -> "EngineOptions":
    """`options` with keyword overrides; unknown names raise a TypeError listing valid ones."""
    if options is not None and not isinstance(options, cls):
      raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}.")
    options = options or cls()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
      raise TypeError(f"unknown engine option(s) {unknown}; EngineOptions has {names}.")
    return dataclasses.replace(options, **overrides) if overrides else options


def smoothing_preferred() -> bool:
  """Whether smooth='auto' smooths: on the CPU backend, with XLA:CPU's concurrency-optimized
  scheduler off in XLA_FLAGS (read when JAX started its backends; `tuning.scheduler`)."""
  from lcsm_jax.tuning import scheduler  # pylint: disable=import-outside-toplevel
  return scheduler.configured() is False and jax.default_backend() == "cpu"


def check_tau(tau) -> str | int | tuple[tuple[int, str], ...]:
  """A valid `tau`, with a mapping normalised to sorted (size, method) pairs (hashable)."""
  if isinstance(tau, str) and tau in TAU_NAMES:
    return tau
  if isinstance(tau, int) and not isinstance(tau, bool):
    if tau < 0:
      raise ValueError(f"an integer tau is the largest direct block size, >= 0; got {tau}.")
    return tau
  if isinstance(tau, (Mapping, tuple)):
    try:
      pairs = tuple(sorted(dict(tau).items()))
    except (TypeError, ValueError):
      raise ValueError(f"a tau mapping must map block sizes to methods, got {tau!r}.") from None
    for size, method in pairs:
      if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"tau mapping keys are block sizes (powers of two), got {size!r}.")
      if method not in blocks.IMPLEMENTATIONS:
        raise ValueError(f"unknown block implementation {method!r} for size {size}; choose one "
                         f"of {blocks.IMPLEMENTATIONS}.")
    return pairs
  raise ValueError(f"tau must be 'auto', 'direct', 'fft', 'pallas', an integer crossover or a "
                   f"mapping {{block size: method}}; got {tau!r}.")


def parse_tau(text: str) -> str | int:
  """A tau given as text (command lines, flags): a name of `TAU_NAMES` or an integer >= 0."""
  if text in TAU_NAMES:
    return text
  try:
    return check_tau(int(text))
  except ValueError:
    raise ValueError(f"tau must be one of {', '.join(TAU_NAMES)} or an integer block size "
                     f">= 0, got {text!r}.") from None
