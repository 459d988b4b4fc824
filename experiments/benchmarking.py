"""Measurement helpers shared by the experiment runners: timing, memory, machine facts, a
results store that skips finished points, the two models under test behind one interface, and
the per-strategy measurement (full runs, or sampled / extrapolated where a full run is too slow).

Timing: compile time apart (`lower(...).compile()` wall time), then `warmup` untimed runs, then
the median of `repeats` runs, each ended by `jax.block_until_ready`.

Memory: XLA's own account of a compiled program (`memory_analysis()`: argument + output + temp
bytes, available without running it, even for shapes that would not fit), the bytes of each
strategy's tables and state (from `jax.eval_shape`, nothing allocated), and the process's peak
resident set (`resource.getrusage`; monotone over a process's life, so a clean per-point figure
needs a fresh process: `experiments/memory.py` runs one per point).

Generation is timed over positions [1, L): a one-token prompt, then L - 1 online positions. The
mixing-only stack feeds each output back as the next input; the language model is teacher
forced (a step's cost does not depend on which token is fed, and no sampling cost is added).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pathlib
import platform
import resource
import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from lcsm_jax import engine
from lcsm_jax import generation
from lcsm_jax import synthetic
from lcsm_jax.engine import EngineOptions
from lcsm_jax.models.hyena import config as config_lib
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.params import init_params
from lcsm_jax.online import HyenaOnline
from lcsm_jax.tuning import machine as machine_lib
from lcsm_jax.tuning.timing import median_seconds  # the runners' timing loop (used as ours)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# A store from another machine (any of these differ) is set aside, not mixed with new points.
MACHINE_KEYS = ("processor", "cpu_model", "cpus", "jax", "backend", "device")


# -- machine, time, memory ------------------------------------------------------------------


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {"processor": platform.processor() or platform.machine(),
          "cpu_model": machine_lib.cpu_model(), "cpus": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "memory_bytes": total_memory_bytes()}


def total_memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def available_memory_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (None where there is none)."""
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def max_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_of(executable) -> dict[str, int]:
  """XLA's memory analysis of a compiled program in bytes; peak = argument + output + temp."""
  analysis = executable.memory_analysis()
  if analysis is None:
    return {}
  memory = {"argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes)}
  memory["peak_bytes"] = sum(memory.values())
  return memory


def compiled(jitted, *args, **static) -> tuple[Any, float, dict[str, int]]:
  """(executable, compile seconds, `memory_of`) of `jitted(*args, **static)`; `args` may be
  arrays or `jax.ShapeDtypeStruct`s (compiling allocates nothing)."""
  start = time.perf_counter()
  executable = jitted.lower(*args, **static).compile()
  return executable, time.perf_counter() - start, memory_of(executable)


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes per second of a jitted sum over a float32 array of `megabytes` (the roofline)."""
  x = jnp.ones((megabytes * (1 << 20) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds, _ = median_seconds(lambda: total(x), repeats)
  return x.nbytes / seconds


def lazy_bytes(length: int, streams: int, batch: int, width: int, prompt: int = 1) -> int:
  """Bytes lazy must read for positions prompt .. length-1: the history of inputs (batch rows)
  and the filter taps over [0, t) for every t, float32 (its memory roofline)."""
  positions = np.arange(prompt, length, dtype=np.int64)
  return int(positions.sum()) * streams * width * 4 * (batch + 1)


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


# -- results --------------------------------------------------------------------------------


def key_of(**config) -> str:
  """The store key of a measured point: its configuration as canonical JSON."""
  return json.dumps(config, sort_keys=True, separators=(",", ":"))


class Store:
  """A JSON file {"machine": ..., "points": {key: value}, ...}; `run` skips finished keys.

  Written after every point (atomically), so an interrupted run keeps what it measured. A
  file measured on another machine (MACHINE_KEYS differ) is renamed aside and a new one begun.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    here = machine()
    data = json.loads(self.path.read_text()) if self.path.exists() else {}
    old = data.get("machine", {})
    if data and any(old.get(k) != here.get(k) for k in MACHINE_KEYS):
      stamp = int(time.time())
      while (aside := self.path.with_name(f"{self.path.name}.{stamp}.other-machine")).exists():
        stamp += 1  # never overwrite an earlier set-aside store
      logging.warning("%s was measured on another machine (%s); moved to %s", self.path,
                      {k: old.get(k) for k in MACHINE_KEYS}, aside)
      self.path.rename(aside)
      data = {}
    data["machine"] = here
    data.setdefault("points", {})
    self.data = data

  @property
  def points(self) -> dict[str, Any]:
    return self.data["points"]

  def get(self, key: str):
    return self.points.get(key)

  def save(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
    os.replace(tmp, self.path)

  def put(self, key: str, value: Any) -> None:
    self.points[key] = value
    self.save()

  def set(self, name: str, value: Any) -> None:
    """A top-level entry (a summary, a fit) beside the points."""
    self.data[name] = value
    self.save()

  def run(self, key: str, measure: Callable[[], Any]):
    """The stored value of `key`, or `measure()` stored under it."""
    done = self.get(key)
    if done is not None:
      logging.info("skipped (measured before): %s", key)
      return done
    logging.info("measuring %s ...", key)
    start = time.perf_counter()
    value = measure()
    logging.info("done in %.1f s: %s -> %s", time.perf_counter() - start, key,
                 json.dumps(value)[:240])
    self.put(key, value)
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
  """Rows of scalars as CSV (columns: the union of the rows' keys, in first-seen order)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


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


def output_paths(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(JSON, CSV, PNG) paths of a runner whose --out is `out` (the JSON)."""
  out = pathlib.Path(out)
  return out, out.with_suffix(".csv"), out.with_suffix(".png")


# -- the models under test ------------------------------------------------------------------


class Program(NamedTuple):
  """A compiled generation program and what was measured making it."""
  run: Callable[[], Any]   # runs it once (returns its outputs)
  compile_seconds: float   # `lower().compile()` of the token loop
  prepare_seconds: float   # filter tables (spectra ...) computed once per model, apart
  memory: dict[str, int]   # `memory_of` the token-loop program


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model and its inputs; `program(...)` compiles generation over positions [prompt, length).

  kind: 'stack' (the mixing-only `synthetic.ConvStack` of `layers` x `width`) or 'lm' (the Hyena
  language model: HyenaDNA architecture with d_model = width, n_layer = layers, d_inner =
  inner_width, the given `order`, vocabulary 12). max_length: the filters' l_max.
  """

  kind: str
  layers: int
  width: int
  batch: int = 1
  inner_width: int = 1024
  order: int = 2
  max_length: int = 4096

  def __post_init__(self):
    if self.kind not in ("stack", "lm"):
      raise ValueError(f"kind must be 'stack' or 'lm', got {self.kind!r}.")

  def replace(self, **changes) -> "Workload":
    return dataclasses.replace(self, **changes)

  def describe(self) -> dict[str, Any]:
    """The fields that define the model (for store keys); no l_max (the filters are
    prefix-consistent, so it changes no timing)."""
    out = {"model": self.kind, "layers": self.layers, "width": self.width, "batch": self.batch}
    if self.kind == "lm":
      out.update(inner_width=self.inner_width, order=self.order)
    return out

  @property
  def streams(self) -> int:
    """S: long convolutions in the model."""
    return self.layers * (self.order - 1 if self.kind == "lm" else 1)

  @property
  def channels(self) -> int:
    """S * B * D: the width of one flash block."""
    return self.streams * self.batch * self.width

  def config(self) -> config_lib.HyenaConfig:
    return config_lib.preset("large-1m").replace(
        d_model=self.width, n_layer=self.layers, d_inner=self.inner_width,
        l_max=self.max_length, order=self.order)

  def online(self):
    """The model as the engine sees it (the online interface of `lcsm_jax/online.py`)."""
    if self.kind == "stack":
      return synthetic.ConvStack(self.layers, self.width, self.max_length)
    return HyenaOnline(self.config())

  def params(self):
    if self.kind == "stack":
      return self.online().init(jax.random.key(0))
    return init_params(self.config(), jax.random.key(0))

  def abstract_params(self):
    """The parameters' shapes and dtypes, nothing allocated."""
    if self.kind == "stack":
      return jax.eval_shape(self.online().init, jax.random.key(0))
    config = self.config()
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))

  def inputs(self, length: int):
    """(B, length, D) float32 vectors (stack) or (B, length) int32 tokens (lm)."""
    if self.kind == "stack":
      return jax.random.normal(jax.random.key(1), (self.batch, length, self.width))
    return jnp.asarray(np.random.default_rng(1).integers(0, 12, (self.batch, length)), jnp.int32)

  def abstract_inputs(self, length: int):
    if self.kind == "stack":
      return jax.ShapeDtypeStruct((self.batch, length, self.width), jnp.float32)
    return jax.ShapeDtypeStruct((self.batch, length), jnp.int32)

  def mixer(self, strategy: str, num_steps: int, options: EngineOptions):
    return engine.make_mixer(strategy, num_steps, self.channels, options)

  def _check_length(self, length: int) -> None:
    if length > self.max_length:
      raise ValueError(f"length {length} exceeds the workload's max_length {self.max_length}.")

  def _loop(self, online, mixer, params, tables, constants, length: int, prompt: int,
            abstract: bool = False):
    """(jitted function, its arguments, its static keywords) of the token loop; with
    `abstract`, the inputs are ShapeDtypeStructs."""
    inputs = self.abstract_inputs(length) if abstract else self.inputs(length)
    if self.kind == "stack":
      prompt_inputs = (jax.ShapeDtypeStruct((self.batch, prompt, self.width), jnp.float32)
                       if abstract else inputs[:, :prompt])
      return (synthetic._rollout, (params, tables, constants, prompt_inputs),  # pylint: disable=protected-access
              dict(stack=online, mixer=mixer, num_steps=length - prompt))
    return (generation._teacher_forced, (params, tables, constants, inputs),  # pylint: disable=protected-access
            dict(online=online, mixer=mixer, prompt_length=prompt))

  def program(self, params, strategy: str, length: int, prompt: int,
              options: EngineOptions) -> Program:
    """Compiled generation of positions [prompt, length) after a prompt of `prompt` >= 1."""
    self._check_length(length)
    online, mixer = self.online(), self.mixer(strategy, length - prompt, options)
    prepare, _, _ = compiled(engine.prepare_tables, params, online=online, mixer=mixer,
                             total=length)
    start = time.perf_counter()
    tables, constants = jax.block_until_ready(prepare(params))
    prepare_seconds = time.perf_counter() - start
    fn, args, static = self._loop(online, mixer, params, tables, constants, length, prompt)
    executable, seconds, memory = compiled(fn, *args, **static)
    return Program(lambda: executable(*args), seconds, prepare_seconds, memory)

  def forward(self, params, length: int) -> Program:
    """One offline parallel forward over `length` positions (stack: `ConvStack.forward`; lm:
    `HyenaLM.apply`, filters included)."""
    self._check_length(length)
    x = self.inputs(length)
    if self.kind == "stack":
      fn = jax.jit(self.online().forward)
    else:
      config = self.config()
      fn = jax.jit(lambda p, t: HyenaLM(config).apply(p, t))
    executable, seconds, memory = compiled(fn, params, x)
    return Program(lambda: executable(params, x), seconds, 0.0, memory)

  def estimate(self, strategy: str, length: int, options: EngineOptions,
               prompt: int = 1) -> dict[str, Any]:
    """Memory of generating [prompt, length) without running (or allocating) anything.

    Returns bytes: params, tables (filters, spectra ...), state (the strategy's buffers after
    the prompt, by `jax.eval_shape`; for 'recompute' the padded input buffer), XLA's analysis
    of the table program and of the token-loop program, and `peak_bytes`, the larger of the
    two programs' peaks (the loop's arguments hold params and tables).
    """
    self._check_length(length)
    online, mixer = self.online(), self.mixer(strategy, length - prompt, options)
    params = self.abstract_params()
    prep, prep_seconds, prep_memory = compiled(engine.prepare_tables, params, online=online,
                                               mixer=mixer, total=length)
    tables, constants = jax.eval_shape(
        lambda p: engine.prepare_tables(p, online=online, mixer=mixer, total=length), params)
    if mixer is None:  # recompute keeps the inputs of every position
      state = self.abstract_inputs(length)
    else:
      prompt_inputs = jax.ShapeDtypeStruct((prompt, self.streams, self.batch, self.width),
                                           jnp.float32)
      state = jax.eval_shape(lambda t, a: mixer.init(t, a, length - prompt), tables,
                             prompt_inputs)
    fn, args, static = self._loop(online, mixer, params, tables, constants, length, prompt,
                                  abstract=True)
    loop, loop_seconds, loop_memory = compiled(fn, *args, **static)
    del loop, prep
    jax.clear_caches()  # so that a later `program` of this shape compiles (and is timed) anew
    return {"params_bytes": tree_bytes(params),
            "tables_bytes": tree_bytes(tables) if tables is not None else 0,
            "state_bytes": tree_bytes(state),
            "state_bytes_per_token": tree_bytes(state) / length,
            "prepare_program": prep_memory, "loop_program": loop_memory,
            "peak_bytes": max(prep_memory.get("peak_bytes", 0),
                              loop_memory.get("peak_bytes", 0)),
            "compile_seconds": prep_seconds + loop_seconds}


# -- measuring one strategy -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
  """When and how a slow strategy is measured on a sample instead of a full run.

  lazy_above: lazy is sampled for L above this: per-token cost at `positions` prompt lengths t
    spread over [1, L), as (T(t, k) - T(t, 0)) / k with T(t, k) the time of k online steps after
    a prompt of t (the steps run at positions t .. t+k-1), then interpolated linearly over every
    position and summed.
  recompute_above: recompute is sampled for L above this: its per-token cost is that of one
    forward over the position's power-of-two bucket, so one sample (of `recompute_steps` steps)
    per bucket, times the positions in the bucket; the positions below 4 * recompute_steps run
    in full.
  eager_max: eager (whose per-token cost depends on the steps still to come, so it cannot be
    measured from a prompt) runs in full up to this L; above, its full-run time at eager_max/4,
    eager_max/2 and eager_max is fitted by c + a n + b n^2 (n = steps, coefficients >= 0)
    and extrapolated.
  """

  lazy_above: int = 8192
  recompute_above: int = 1024
  eager_max: int = 8192
  positions: int = 4
  steps: int = 64
  recompute_steps: int = 4

  def method(self, strategy: str, length: int) -> str:
    """'full', 'sampled' or 'extrapolated'."""
    if strategy == "lazy" and length > self.lazy_above:
      return "sampled"
    if strategy == "recompute" and length > self.recompute_above:
      return "sampled"
    if strategy == "eager" and length > self.eager_max:
      return "extrapolated"
    return "full"


_MEMO: dict[Any, dict[str, Any]] = {}


def _memoized(key, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """`measure()`, measured once per process for `key` (sweeps over L share samples: the
  recompute bucket samples, eager's fit runs). Unhashable keys are not memoized."""
  try:
    hash(key)
  except TypeError:
    return measure()
  if key not in _MEMO:
    _MEMO[key] = measure()
  return _MEMO[key]


def steps_seconds(work, params, strategy, prompt, steps, options, repeats) -> dict[str, Any]:
  """Seconds of `steps` online positions after a prompt of `prompt`: T(prompt, steps) -
  T(prompt, 0), the same program with no steps (prefill and set-up cancel out). Memoized per
  process (the parameters' values, and l_max, change no timing)."""
  key = ("steps", work.replace(max_length=0), strategy, prompt, steps, options, repeats)
  return _memoized(key, lambda: _steps_seconds(work, params, strategy, prompt, steps, options,
                                               repeats))


def _steps_seconds(work, params, strategy, prompt, steps, options, repeats) -> dict[str, Any]:
  with_steps = work.program(params, strategy, prompt + steps, prompt, options)
  none = work.program(params, strategy, prompt, prompt, options)
  t_steps = median_seconds(with_steps.run, repeats)[0]
  t_none = median_seconds(none.run, repeats)[0]
  seconds, bound = t_steps - t_none, False
  if seconds <= 0:  # lost in the noise (tiny sizes): fall back to an upper bound
    seconds, bound = t_steps, True
  return {"seconds": seconds, "upper_bound": bound,
          "compile_seconds": with_steps.compile_seconds + none.compile_seconds,
          "memory": with_steps.memory}


def _full(work, params, strategy, length, options, repeats, warmup=1) -> dict[str, Any]:
  program = work.program(params, strategy, length, 1, options)
  seconds, runs = median_seconds(program.run, repeats, warmup)
  return {"total_seconds": seconds, "runs_seconds": runs, "method": "full",
          "compile_seconds": program.compile_seconds,
          "prepare_seconds": program.prepare_seconds, "xla_memory": program.memory}


def _lazy_sampled(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  k = min(sampling.steps, length - 1)
  starts = np.unique(np.linspace(1, length - k, max(sampling.positions, 2)).astype(int))
  per_token, compile_seconds, memory, bound = [], 0.0, {}, False
  for t in starts:
    sample = steps_seconds(work, params, "lazy", int(t), k, options, repeats)
    per_token.append(sample["seconds"] / k)
    compile_seconds += sample["compile_seconds"]
    memory, bound = sample["memory"], bound or sample["upper_bound"]
    logging.info("lazy at t=%d (L=%d): %.1f us/token", t, length, per_token[-1] * 1e6)
  centres = starts + (k - 1) / 2  # each sample is the mean over positions t .. t+k-1
  all_t = np.arange(1, length, dtype=float)
  total = float(np.interp(all_t, centres, per_token).sum())
  return {"total_seconds": total, "method": "sampled", "compile_seconds": compile_seconds,
          "xla_memory": memory, "upper_bound": bound,
          "sample_positions": starts.tolist(), "sample_steps": k,
          "sample_per_token_seconds": per_token,
          "sampling": "per-token cost (T(t, k) - T(t, 0)) / k at the sampled prompt lengths t, "
                      "interpolated linearly over positions 1 .. L-1 and summed"}


def recompute_buckets(length: int) -> list[int]:
  """The forward lengths of 'recompute' in a run of total length L (engine.run_recompute)."""
  return sorted({min(1 << k, length) for k in range(length.bit_length() + 1)})


def _recompute_sampled(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  k = sampling.recompute_steps
  buckets = recompute_buckets(length)
  head = next(b for b in buckets if b >= min(4 * k, length))
  first = steps_seconds(work, params, "recompute", 1, head - 1, options, repeats)
  total, compile_seconds, bound = first["seconds"], first["compile_seconds"], first["upper_bound"]
  memory, samples = first["memory"], []
  for previous, bucket in zip(buckets, buckets[1:]):
    if bucket <= head:
      continue
    start = max(previous, bucket - k)  # the bucket's last positions t .. bucket-1
    sample = steps_seconds(work, params, "recompute", start, bucket - start, options, repeats)
    cost = sample["seconds"] / (bucket - start)
    total += cost * (bucket - previous)
    compile_seconds += sample["compile_seconds"]
    memory, bound = sample["memory"], bound or sample["upper_bound"]
    samples.append({"bucket": bucket, "positions": bucket - previous, "per_token_seconds": cost})
    logging.info("recompute, bucket %d (L=%d): %.2f ms/token", bucket, length, cost * 1e3)
  return {"total_seconds": total, "method": "sampled", "compile_seconds": compile_seconds,
          "xla_memory": memory, "upper_bound": bound, "head_positions": head - 1,
          "head_seconds": first["seconds"], "buckets": samples,
          "sampling": "positions 1 .. head-1 run in full; every later power-of-two bucket "
                      "(one forward over the bucket per token) sampled at its last positions, "
                      "times the positions in the bucket"}


def _eager_extrapolated(work, params, length, options, repeats, sampling) -> dict[str, Any]:
  lengths = sorted({max(sampling.eager_max // 4, 8), max(sampling.eager_max // 2, 9),
                    sampling.eager_max})
  if len(lengths) < 3:
    raise ValueError(f"eager_max {sampling.eager_max} is too small to extrapolate from.")
  runs = [_memoized(("full", work.replace(max_length=0), "eager", m, options, repeats),
                    lambda m=m: _full(work, params, "eager", m, options, repeats))
          for m in lengths]
  n = np.asarray(lengths, float) - 1
  coef, _ = scipy.optimize.nnls(np.stack([np.ones_like(n), n, n * n], -1),
                                np.asarray([r["total_seconds"] for r in runs]))
  steps = length - 1
  total = float(coef[0] + coef[1] * steps + coef[2] * steps * steps)
  return {"total_seconds": total, "method": "extrapolated",
          "compile_seconds": sum(r["compile_seconds"] for r in runs),
          "xla_memory": runs[-1]["xla_memory"], "fit_lengths": lengths,
          "fit_total_seconds": [r["total_seconds"] for r in runs],
          "fit_coefficients": coef.tolist(),
          "sampling": "full runs at the fit lengths, fitted by c + a n + b n^2 (n = steps; "
                      "non-negative least squares) and evaluated at n = L - 1"}


def measure_strategy(work: Workload, params, strategy: str, length: int,
                     options: EngineOptions, repeats: int = 3,
                     sampling: Sampling = Sampling(), warmup: int = 1) -> dict[str, Any]:
  """Time of generating positions [1, L) with `strategy`, measured as `sampling` says.

  Returns a JSON-able dict: total_seconds, per_token_seconds (total / (L - 1)), compile_seconds
  (all programs it compiled), xla_memory (of the largest program it ran), method ('full',
  'sampled' or 'extrapolated'), sampled (method != 'full'), the samples where sampled, and
  peak_rss_bytes_so_far of this process.
  """
  method = sampling.method(strategy, length)
  if method == "full":
    entry = _full(work, params, strategy, length, options, repeats, warmup)
  elif strategy == "lazy":
    entry = _lazy_sampled(work, params, length, options, repeats, sampling)
  elif strategy == "recompute":
    entry = _recompute_sampled(work, params, length, options, repeats, sampling)
  else:
    entry = _eager_extrapolated(work, params, length, options, repeats, sampling)
  entry["sampled"] = method != "full"
  entry["per_token_seconds"] = entry["total_seconds"] / (length - 1)
  entry["peak_rss_bytes_so_far"] = max_rss_bytes()
  logging.info("%s L=%d: %.3f s, %.1f us/token, compile %.1f s (%s)", strategy, length,
               entry["total_seconds"], entry["per_token_seconds"] * 1e6,
               entry["compile_seconds"], method)
  return entry


@functools.lru_cache(maxsize=1)
def cached_params(work: Workload):
  """`work.params()`, kept for the last workload (runners sweep lengths of one model)."""
  return work.params()


def parse_tau(tau: str):
  """A --tau flag value: an integer crossover or a name."""
  return int(tau) if tau.lstrip("-").isdigit() else tau


def powers_of_two(low: int, high: int) -> list[int]:
  return [1 << k for k in range(max(low, 1).bit_length() - 1, high.bit_length())
          if low <= 1 << k <= high]


# -- flags shared by the runners ------------------------------------------------------------


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
    flags.DEFINE_string("tau", "auto", "Flash block implementation: auto, direct, fft or an "
                        "integer crossover.", **fv)
  flags.DEFINE_integer("repeats", repeats, "Timed runs (median reported) after one warm-up.",
                       **fv)


def workload_from_flags(f, max_length: int) -> Workload:
  return Workload(f.model, f.layers, f.width, f.batch, f.inner_width, f.order, max_length)


def define_sampling_flags(flag_values, recompute_above: int = 1024) -> None:
  """--sample_above, --sample_recompute_above, --eager_max, --sample_positions,
  --sample_steps, --recompute_sample_steps (see `Sampling`)."""
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


def sampling_key(sampling: Sampling, strategy: str, length: int) -> dict[str, Any]:
  """What of `sampling` a measured point depends on (nothing for a full run), for its key."""
  method = sampling.method(strategy, length)
  key = {"method": method}
  if method != "full":
    key["sampling"] = {"lazy": [sampling.positions, sampling.steps],
                       "recompute": [sampling.recompute_steps],
                       "eager": [sampling.eager_max]}[strategy]
  return key


def fits_in_memory(estimate: dict[str, Any], fraction: float) -> tuple[bool, str]:
  """Whether `Workload.estimate`'s peak fits in `fraction` of the memory available now."""
  available = available_memory_bytes()
  need = estimate["peak_bytes"]
  if available is None:
    return True, f"needs {need / 2**30:.1f} GiB (available memory unknown)"
  ok = need <= fraction * available
  return ok, (f"needs {need / 2**30:.1f} GiB by XLA's estimate, {available / 2**30:.1f} GiB "
              f"available (limit {fraction:.0%})")
