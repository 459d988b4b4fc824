"""The two models under test behind one interface, and their programs, built on the public
decoding API only.

Generation is timed over positions [prompt, L): `prompt` positions prefilled, then L - prompt
online positions.

- The mixing-only stack (`lcsm_jax.models.conv_stack.ConvStack`) runs in a
  `lcsm_jax.decoding.Rollout`: `prefill(inputs[:, :prompt])`, then `run(state, L - prompt)`,
  which feeds each output back as the next input.
- The language model (HyenaDNA architecture, random weights) runs in a `lcsm_jax.Decoder`:
  `prefill(ids[:, :prompt])`, then `score(state, ids[:, prompt:])`, teacher forced (a step's
  cost does not depend on which token is fed, and no sampling cost is added).

Both are made with `donate_state=True` (the online run updates the prefilled state in place, as
one compiled program would) and `check_memory=False` (the runners check memory themselves).

A `Program` is measured in this order, each part apart:
1. the engine for the batch size (`tau='auto'` resolved: the crossover read from this machine's
   cache, or measured once);
2. compilation: the table program (`table_parts`), then the prefill and online programs
   (`estimate_memory`, which compiles them from shapes, nothing run, and whose analysis is the
   program's memory), each timed by `lcsm_jax.tuning.timing.CompileTimer` (the time JAX records
   for tracing, lowering and compiling); the runs after it reuse those compilations;
3. the filter tables (`tables`, on first use), timed as `prepare_seconds`;
4. the runs (prefill and online positions, as one timed call of `run`), timed by the runners
   with `lcsm_jax.tuning.timing.median_seconds`.

Memory without running anything (`Workload.estimate`): `estimate_memory` and `state_shape` of a
session made from the parameters' shapes (`jax.eval_shape`, so even lengths whose parameters
would not fit can be estimated).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax.decoding import Decoder, EngineOptions, Rollout
from lcsm_jax.decoding import memory as memory_lib
from lcsm_jax.decoding import session as session_lib
from lcsm_jax.decoding import strategies as strategies_lib
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.models.hyena import config as config_lib
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.params import init_params
from lcsm_jax.tuning import crossover as crossover_lib
from lcsm_jax.tuning.timing import CompileTimer

tree_bytes = memory_lib.tree_bytes


class Program(NamedTuple):
  """A compiled generation program and what was measured making it."""
  run: Callable[[], Any]       # prefill, then every online position (one timed call)
  prefill: Callable[[], Any]   # the prefill alone (T(prompt, 0) of the sampled methods)
  compile_seconds: float       # the prefill and online programs
  tables_compile_seconds: float
  prepare_seconds: float       # filter tables (spectra ...) computed once per model, apart
  memory: dict[str, Any]       # `memory_parts` of the session's estimate
  resolved_tau: Any = None     # flash: the tau its engine runs with (tau='auto' resolved)


def fresh_compilation() -> None:
  """Forgets the decoding sessions' compiled programs (`lcsm_jax.decoding.session` keeps one
  per signature for the process), so that the next program is compiled, and timed, anew."""
  session_lib.compile_program.cache_clear()


def memory_parts(parts: dict[str, int]) -> dict[str, Any]:
  """`estimate_memory`'s parts (bytes by name: parameters, tables, prefill, the online run)
  and their sum, `peak_bytes` (what the library checks against the memory available)."""
  return {"parts": dict(parts), "peak_bytes": int(sum(parts.values()))}


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


def lazy_bytes(length: int, streams: int, batch: int, width: int, prompt: int = 1) -> int:
  """Bytes lazy must read for positions prompt .. length-1: the history of inputs (batch rows)
  and the filter taps over [0, t) for every t, float32 (its memory roofline)."""
  positions = np.arange(prompt, length, dtype=np.int64)
  return int(positions.sum()) * streams * width * 4 * (batch + 1)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model and its inputs; `program(...)` compiles generation over positions [prompt, length).

  kind: 'stack' (the mixing-only `ConvStack` of `layers` x `width`) or 'lm' (the Hyena
  language model: HyenaDNA architecture with d_model = width, n_layer = layers, d_inner =
  inner_width, the given `order`, vocabulary 12). max_length: the filters' l_max.
  step_weights (lm): the dtype the step reads the dense kernels in ('float32' or 'bfloat16',
  `lcsm_jax.Decoder(step_weights=...)`). distilled (lm): the distilled filters
  (`lcsm_jax.distill`) a 'modal' session runs on; not part of the workload's identity (hash,
  equality), only of its sessions.
  """

  kind: str
  layers: int
  width: int
  batch: int = 1
  inner_width: int = 1024
  order: int = 2
  max_length: int = 4096
  step_weights: str = "float32"
  distilled: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def __post_init__(self):
    if self.kind not in ("stack", "lm"):
      raise ValueError(f"kind must be 'stack' or 'lm', got {self.kind!r}.")
    if self.step_weights not in ("float32", "bfloat16"):
      raise ValueError(f"step_weights must be 'float32' or 'bfloat16', got "
                       f"{self.step_weights!r}.")
    if self.kind == "stack" and self.step_weights != "float32":
      raise ValueError("step_weights applies to the language model only (kind='lm').")

  def replace(self, **changes) -> "Workload":
    return dataclasses.replace(self, **changes)

  def describe(self) -> dict[str, Any]:
    """The fields that define the model (for store keys); no l_max (the filters are
    prefix-consistent, so it changes no timing)."""
    out = {"model": self.kind, "layers": self.layers, "width": self.width, "batch": self.batch}
    if self.kind == "lm":
      out.update(inner_width=self.inner_width, order=self.order)
      if self.step_weights != "float32":  # float32 keys as before, so stored points stay valid
        out.update(step_weights=self.step_weights)
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

  def stack(self) -> ConvStack:
    return ConvStack(self.layers, self.width, self.max_length)

  def params(self):
    if self.kind == "stack":
      return self.stack().init(jax.random.key(0))
    return init_params(self.config(), jax.random.key(0))

  def abstract_params(self):
    """The parameters' shapes and dtypes, nothing allocated."""
    return jax.eval_shape(self.params)

  def inputs(self, length: int) -> np.ndarray:
    """(B, length, D) float32 vectors (stack) or (B, length) int32 token ids (lm), NumPy."""
    rng = np.random.default_rng(1)
    if self.kind == "stack":
      return rng.standard_normal((self.batch, length, self.width), np.float32)
    return rng.integers(0, 12, (self.batch, length)).astype(np.int32)

  def _check_length(self, length: int) -> None:
    if length > self.max_length:
      raise ValueError(f"length {length} exceeds the workload's max_length {self.max_length}.")

  def session(self, params, strategy: str, length: int, options: EngineOptions,
              donate_state: bool = True) -> Rollout | Decoder:
    """The public decoding front end of this model for sequences of `length` positions."""
    self._check_length(length)
    options = EngineOptions.create(options, check_memory=False)
    if self.kind == "stack":
      return Rollout(params, self.stack(), strategy, max_length=length, options=options,
                     donate_state=donate_state)
    return Decoder(params, self.config(), strategy, max_length=length, options=options,
                   check_finite=False, donate_state=donate_state,
                   step_weights=self.step_weights,
                   distilled=self.distilled if strategy == "modal" else None)

  def estimate_memory(self, session, prompt: int, steps: int) -> dict[str, int]:
    """`session.estimate_memory` for a prompt of `prompt` and `steps` online positions (the
    prefill and online programs compiled from shapes; nothing runs)."""
    if self.kind == "stack":
      return session.estimate_memory(self.batch, prompt, steps or None)
    return session.estimate_memory(self.batch, prompt, score_tokens=steps or None)

  def calls(self, session, length: int, prompt: int
            ) -> tuple[Callable[[], Any], Callable[[int], Any], Callable[[Any, int], Any]]:
    """(start, online, step) over this workload's inputs: `start()` prefills positions
    [0, prompt) and returns the state; `online(steps)` prefills and runs positions
    [prompt, prompt + steps); `step(state, t)` feeds position t alone (returning its output
    and the new state)."""
    inputs = self.inputs(length)
    if self.kind == "stack":
      head = jnp.asarray(inputs[:, :prompt])
      start = lambda: session.prefill(head)[1]
      online = lambda steps: session.run(start(), steps)
      step = lambda state, t: session.run(state, 1)
    else:
      start = lambda: session.prefill(inputs[:, :prompt])
      online = lambda steps: session.score(start(), inputs[:, prompt:prompt + steps])
      step = lambda state, t: session.score(state, inputs[:, t:t + 1])
    return start, online, step

  def program(self, params, strategy: str, length: int, prompt: int,
              options: EngineOptions) -> Program:
    """Compiled generation of positions [prompt, length) after a prompt of `prompt` >= 1.
    `params`: the parameters, or a function making them, called here so that only the
    session holds them (it lets the filters' parameters go once its tables exist, where its
    strategy's tables hold the filters: `decoding.session.Session.params`)."""
    session = self.session(params() if callable(params) else params, strategy, length, options)
    engine = session.engine(self.batch)  # tau='auto' resolved before anything is timed
    fresh_compilation()
    with CompileTimer() as tables_timer:
      session.table_parts()
    with CompileTimer() as timer:
      parts = self.estimate_memory(session, prompt, length - prompt)
    start = time.perf_counter()
    jax.block_until_ready(session.tables)
    prepare_seconds = time.perf_counter() - start
    prefill, online, _ = self.calls(session, length, prompt)
    steps = length - prompt
    run = (lambda: online(steps)) if steps else prefill
    return Program(run, prefill, timer.seconds, tables_timer.seconds, prepare_seconds,
                   memory_parts(parts), getattr(engine.strategy, "tau", None))

  def forward(self, params, length: int) -> Program:
    """One offline parallel forward over `length` positions (stack: `ConvStack.forward`; lm:
    `HyenaLM.apply`, filters included), compiled apart (`lower().compile()`)."""
    self._check_length(length)
    x = jnp.asarray(self.inputs(length))
    if self.kind == "stack":
      fn = jax.jit(self.stack().forward)
    else:
      config = self.config()
      fn = jax.jit(lambda p, t: HyenaLM(config).apply(p, t))
    start = time.perf_counter()
    executable = fn.lower(params, x).compile()
    seconds = time.perf_counter() - start
    run = lambda: executable(params, x)
    return Program(run, run, seconds, 0.0, 0.0, memory_of(executable))

  def estimate(self, strategy: str, length: int, options: EngineOptions,
               prompt: int = 1) -> dict[str, Any]:
    """Memory of generating [prompt, length) without running (or allocating) anything.

    The session is made from the parameters' shapes inside `jax.eval_shape`, so nothing is
    allocated: `estimate_memory` (XLA's analysis of the table, prefill and online programs,
    compiled from shapes) and `state_shape`. Returns bytes: params, tables (filters, spectra
    ...: `abstract_tables`), state (the strategy's buffers after the prompt; for 'recompute'
    the padded inputs), decode_state (the whole state: the model's carry too), the parts of
    `estimate_memory` with their sum `peak_bytes` (online_program_bytes: the online run's),
    and the compile seconds.
    """
    self._check_length(length)
    if strategies_lib.needs_crossover(strategy, options):
      crossover_lib.crossover(self.channels)  # measured (and cached) outside the trace below
    found: dict[str, Any] = {}

    def build(params):
      session = self.session(params, strategy, length, options)
      with CompileTimer() as timer:
        parts = self.estimate_memory(session, prompt, length - prompt)
      state = session.state_shape(self.batch, prompt)
      found.update(parts=parts, seconds=timer.seconds,
                   tables=tree_bytes(session.abstract_tables()),
                   state=tree_bytes(state.engine.strategy), decode_state=tree_bytes(state))
      return ()

    jax.eval_shape(build, self.abstract_params())
    fresh_compilation()
    jax.clear_caches()  # the programs compiled for the estimate are not kept
    return {"params_bytes": found["parts"]["parameters"], "tables_bytes": found["tables"],
            "state_bytes": found["state"], "state_bytes_per_token": found["state"] / length,
            "decode_state_bytes": found["decode_state"],
            "programs": found["parts"], "peak_bytes": int(sum(found["parts"].values())),
            "online_program_bytes": found["parts"].get("rollout",
                                                       found["parts"].get("scoring", 0)),
            "compile_seconds": found["seconds"]}


@functools.lru_cache(maxsize=1)
def cached_params(work: Workload):
  """`work.params()`, kept for the last workload (runners sweep lengths of one model)."""
  return work.params()
