"""What every decoding front end shares (`Decoder` for language models, `Rollout` for models
that feed their output back): parameters on the device, filter tables computed once, one
`Engine` per batch size (tau='auto' resolved there, explicitly), compiled programs kept by
signature, and memory checks before anything runs. On a device mesh (`sharding`), the Session
places the parameters and the strategy's extra inputs by their layouts (`decoding.sharding`),
and every compiled program is specialised on its arguments' shardings.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lcsm_jax.decoding import memory
from lcsm_jax.decoding import sharding as sharding_lib
from lcsm_jax.decoding import strategies
from lcsm_jax.decoding.engine import Engine, EngineTables
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.models.interface import OnlineModel, Params
from lcsm_jax.tuning import crossover as crossover_lib
from lcsm_jax.tuning import engine_tau

def _placement(x: Any) -> Any:
  """A leaf's sharding when it spans several devices (else None: the default device)."""
  sharding = getattr(x, "sharding", None)
  if sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return None
  return sharding


def signature(tree: Any) -> tuple:
  """A hashable description of a pytree's structure, shapes, dtypes and (on a mesh)
  shardings."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), x.dtype, _placement(x)) for x in leaves)


def abstract(sig: tuple) -> Any:
  """The `jax.ShapeDtypeStruct` pytree of a `signature`."""
  treedef, leaves = sig
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d, sharding=p)
                                      for s, d, p in leaves])


@functools.lru_cache(maxsize=256)
def compile_program(program: Callable, static: tuple, sig: tuple) -> Any:
  """`program` (a jitted function) lowered for arguments of signature `sig` and static keyword
  arguments `static` ((name, value) pairs), compiled once per process.

  Before compiling, a process that holds more than 3/4 of the kernel's memory mappings (see
  `memory.memory_mappings`) forgets its compiled programs (`clear_caches`, with a warning),
  rather than letting XLA's compiler crash at the limit."""
  _release_programs_near_mapping_limit()
  return program.lower(*abstract(sig), **dict(static)).compile()


def _release_programs_near_mapping_limit() -> None:
  counts = memory.memory_mappings()
  if counts is None or counts[0] <= counts[1] * 3 // 4:
    return
  warnings.warn(
      f"this process holds {counts[0]} memory mappings of the {counts[1]} the kernel allows "
      "(vm.max_map_count; each compiled XLA program keeps a few), where XLA's compiler would "
      "crash: lcsm_jax cleared the compiled programs it and JAX keep (lcsm_jax.clear_caches); "
      "the next calls compile anew.", RuntimeWarning, stacklevel=4)
  clear_caches()


@functools.lru_cache(maxsize=256)
def shapes_of(fn: Callable, static: tuple, sig: tuple) -> Any:
  """`jax.eval_shape` of fn(*args, **static) for arguments of signature `sig`, traced once per
  process (a repeated estimate then costs no tracing)."""
  return jax.eval_shape(functools.partial(fn, **dict(static)), *abstract(sig))


def clear_caches() -> None:
  """Forgets every compiled program this library keeps (the sessions' programs, their shapes
  and memory analyses) and JAX's own caches (`jax.clear_caches`); the next call compiles anew.

  Each compiled XLA:CPU program holds its machine code in a few memory mappings of its own. A
  process that compiles thousands of programs (a test suite, a sweep over many shapes and
  strategies) can reach the kernel's limit on mappings (`vm.max_map_count`, 65530 by default),
  and XLA's compiler then crashes (a segmentation fault). Call this between unrelated workloads
  of such a process; the programs still referenced elsewhere stay alive."""
  compile_program.cache_clear()
  shapes_of.cache_clear()
  memory.program_bytes.cache_clear()
  jax.clear_caches()


def _prepare(params, aux, *, engine: Engine) -> EngineTables:
  return engine.prepare(params, aux)


prepare_program = jax.jit(_prepare, static_argnames=("engine",))


class Session:
  """A model, its parameters, a strategy and a maximum length, ready to decode.

  Attributes:
    model: the model's online adapter.
    params: the parameters the compiled programs read, on the default device: the model's,
      or, when the strategy's tables supply the filters (`supplies_filters`) and the model
      can drop what only its filters read (`without_filters`), those without them. The full
      parameters are kept until the tables are made, then released (only the caller's own
      reference keeps them alive).
    strategy: the strategy's registry name.
    max_length: positions every sequence may reach (tables and states are sized for it); at
      most the model's, except for strategies that are `unbounded` (modal).
    prompt_limit: the longest prompt (the model's parallel prefill stops at its max_length).
    options: the engine's options.
    aux: the strategy's extra inputs (e.g. distilled filters), or None.
    sharding: the device mesh and its axes (`decoding.sharding.Sharding`), or None: one
      device. Parameters go to the mesh by the model's `param_partition` (replicated if it
      has none); batches must divide over the data axis, the model's width over the model axis.
  """

  def __init__(self, params: Params, model: OnlineModel, strategy: str = "flash",
               max_length: int | None = None, options: EngineOptions | None = None,
               aux: Any = None, sharding: sharding_lib.Sharding | None = None):
    cls = strategies.strategy_class(strategy)  # a clear error for unknown names
    cls.check_aux(aux, model)
    if sharding is not None:
      sharding.check(width=model.width)
    self.sharding = sharding
    self.model = model
    self.strategy = strategy
    self.options = (options if options is not None else EngineOptions()).resolved()
    if max_length is None:
      max_length = model.max_length
    limit = None if cls.unbounded else model.max_length
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or \
        max_length < 1 or (limit is not None and max_length > limit):
      raise ValueError(
          f"max_length must be an integer in [1, {model.max_length}] (the model's maximum "
          f"length), got {max_length!r}." if limit is not None else
          f"max_length must be an integer >= 1, got {max_length!r}.")
    self.max_length = int(max_length)
    self.prompt_limit = min(self.max_length, model.max_length)
    self._table_engine = Engine(model, strategies.create(strategy, self.options),
                                self.max_length, sharding)
    partition = getattr(model, "param_partition", lambda params: sharding_lib.REPLICATED)
    self._full_params = sharding_lib.place(sharding, params,
                                           partition(params) if sharding else None)
    without_filters = getattr(model, "without_filters", None)
    self.params = (without_filters(self._full_params)
                   if without_filters and self._table_engine.strategy.supplies_filters
                   else self._full_params)
    self.aux = aux if aux is None else sharding_lib.place(
        sharding, aux, self._table_engine.strategy.aux_layout(aux) if sharding else None)
    self._tables: EngineTables | None = None
    self._engines: dict[int, Engine] = {}

  # -- tables and engines --

  @property
  def tables(self) -> EngineTables:
    """Filter tables for `max_length` positions, computed on first use and kept."""
    if self._tables is None:
      self.check_memory(self.table_parts, "use a smaller max_length")
      self._tables = self._run(prepare_program, dict(engine=self._table_engine),
                               self._full_params, self.aux)
      self._full_params = None
    return self._tables

  def abstract_tables(self) -> EngineTables:
    """The tables if built, else their shapes (`jax.ShapeDtypeStruct`s; nothing runs). On a
    mesh the tables are built (their shardings are part of every program's signature)."""
    if self._tables is not None or self.sharding is not None:
      return self.tables
    return self.shapes(_prepare, dict(engine=self._table_engine), self._full_params,
                       self.aux)

  def engine(self, batch: int) -> Engine:
    """The engine for batches of `batch` rows. tau='auto' is resolved here, once per batch
    size (`lcsm_jax.tuning.engine_tau.crossover`): the direct/FFT crossover for the block
    width S x batch x D, or with base > 2 and max_length >= 4096 the fastest tau of the engine
    itself, read from this machine's cache or measured once (seconds, logged) and cached.
    On a mesh, a batch that does not divide over the data axis is refused (ValueError)."""
    if batch not in self._engines:
      if self.sharding is not None:
        self.sharding.check(batch=batch)
      crossover = pallas_max = None
      if strategies.needs_crossover(self.strategy, self.options):
        crossover = engine_tau.crossover(self.model.num_streams, batch, self.model.width,
                                         self.options, self.max_length,
                                         sharded=self.sharding is not None)
        pallas_max = crossover_lib.pallas_crossover()
      strategy = strategies.create(self.strategy, self.options, crossover=crossover,
                                   pallas_max=pallas_max)
      self._engines[batch] = Engine(self.model, strategy, self.max_length, self.sharding)
    return self._engines[batch]

  # -- compiled programs --

  def compiled(self, program: Callable, static: Mapping[str, Any], *args) -> Any:
    """The compiled `program` for `args` (kept per signature; compiled on first use)."""
    return compile_program(program, tuple(sorted(static.items())), signature(args))

  def shapes(self, fn: Callable, static: Mapping[str, Any], *args) -> Any:
    """The output shapes of fn(*args, **static) (`shapes_of`, kept per signature)."""
    return shapes_of(fn, tuple(sorted(static.items())), signature(args))

  def put(self, tree: Any) -> Any:
    """On a mesh: `tree` with every leaf not yet on the mesh replicated over it; on one
    device, `tree` as it is."""
    if self.sharding is None:
      return tree
    mesh, replicated = self.sharding.mesh, self.sharding.named(sharding_lib.REPLICATED)

    def put_leaf(x):
      placed = getattr(x, "sharding", None)
      if isinstance(placed, jax.sharding.NamedSharding) and placed.mesh == mesh:
        return x
      return jax.device_put(x, replicated)

    return jax.tree.map(put_leaf, tree)

  def _run(self, program: Callable, static: Mapping[str, Any], *args) -> Any:
    args = self.put(args)
    return self.compiled(program, static, *args)(*args)

  # -- memory --

  def table_parts(self) -> dict[str, int]:
    """Bytes the tables will take (0 once they exist), tables and their program's working
    memory, by XLA's analysis of the compiled table program."""
    if self._tables is not None:
      return {}
    compiled = self.compiled(prepare_program, dict(engine=self._table_engine),
                             self._full_params, self.aux)
    return {"filter tables and their computation": memory.program_bytes(compiled)}

  def check_memory(self, parts: Mapping[str, int] | Callable[[], Mapping[str, int]],
                   advice: str) -> None:
    """Refuses (InsufficientMemoryError) when `parts` (or what `parts()` returns: estimates
    are only made when checked) exceed the available memory, unless the options say
    check_memory=False."""
    if not self.options.check_memory:
      return
    parts = parts() if callable(parts) else parts
    if parts:
      memory.check_fits(parts, advice=f"{advice} (or pass check_memory=False to run anyway).")
