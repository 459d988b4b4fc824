"""`Rollout`: generation for models whose output at a position is the next position's input
(vectors, not tokens), such as the mixing-only `models.conv_stack.ConvStack`.

  rollout = Rollout(params, ConvStack(8, 256, 4096), strategy="flash")
  outputs, state = rollout.prefill(prompt)        # prompt (B, P, D)
  outputs, state = rollout.run(state, 100)        # the next 100 outputs (B, 100, D)
"""

from __future__ import annotations

from typing import Any

from flax import struct
import jax
import jax.numpy as jnp

from lcsm_jax.decoding import memory
from lcsm_jax.decoding import sharding as sharding_lib
from lcsm_jax.decoding.engine import Engine, EngineState
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.session import Session
from lcsm_jax.models.interface import OnlineModel

Array = jax.Array


@struct.dataclass
class RolloutState:
  engine: EngineState
  last: Array  # (B, D) the latest output: the next input


_LAST = sharding_lib.ROW_CHANNELS  # the layout of the latest output (B, D)


def _prefill(params, tables, prompt, *, engine: Engine):
  outputs, state = engine.prefill(params, tables, prompt)
  last = sharding_lib.constrain(engine.sharding, outputs[:, -1].astype(jnp.float32), _LAST)
  return outputs, RolloutState(state, last)


def _run(params, tables, state: RolloutState, *, engine: Engine, num_steps: int):
  batch, width = state.last.shape
  first = state.engine.position - state.engine.prompt_length
  outputs = jnp.zeros((batch, num_steps, width), jnp.float32)

  def feed(io, r):
    return io[1]

  def emit(io, r, out):
    out = out.astype(jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(io[0], out, r - first, axis=1), out

  engine_state, (outputs, last) = engine.run(params, tables, state.engine, num_steps,
                                             (outputs, state.last), feed, emit)
  return outputs, RolloutState(engine_state, sharding_lib.constrain(engine.sharding, last, _LAST))


_PREFILL = jax.jit(_prefill, static_argnames=("engine",))
_RUN = jax.jit(_run, static_argnames=("engine", "num_steps"))
_RUN_DONATING = jax.jit(_run, static_argnames=("engine", "num_steps"), donate_argnames="state")


class Rollout(Session):
  """A vector model (`models.interface.OnlineModel`) rolled out with any strategy; the
  arguments are those of `Session`, and donate_state: `run` reuses the buffers of the state it
  is given for the state it returns (as `Decoder`'s; the given state must not be used again);
  mesh, mesh_axes: as `Decoder`'s (a `jax.sharding.Mesh`; batch rows on its data axis,
  channels on its model axis)."""

  def __init__(self, params: Any, model: OnlineModel, strategy: str = "flash",
               max_length: int | None = None, options: EngineOptions | None = None, *,
               distilled: Any = None, donate_state: bool = False,
               mesh: jax.sharding.Mesh | None = None,
               mesh_axes: tuple[str | None, str | None] = ("data", "model"), **engine_options):
    super().__init__(params, model, strategy, max_length,
                     EngineOptions.create(options, **engine_options),
                     aux=getattr(distilled, "filters", distilled),
                     sharding=sharding_lib.create(mesh, mesh_axes))
    self.donate_state = bool(donate_state)
    self._run_program = _RUN_DONATING if self.donate_state else _RUN

  def prefill(self, prompt) -> tuple[Array, RolloutState]:
    """prompt (B, P, D) float, 1 <= P <= max_length -> (outputs (B, P, D), state)."""
    prompt = jnp.asarray(prompt, jnp.float32)
    if prompt.ndim != 3 or not 1 <= prompt.shape[1] <= self.prompt_limit or \
        prompt.shape[2] != self.model.width:
      raise ValueError(f"prompt must have shape (batch, 1..{self.prompt_limit}, "
                       f"{self.model.width}), got {prompt.shape}.")
    static = dict(engine=self.engine(prompt.shape[0]))
    tables = self.tables
    if self.sharding is not None:
      prompt = sharding_lib.place(self.sharding, prompt, sharding_lib.ROWS)
    compiled = self.compiled(_PREFILL, static, self.params, tables, prompt)
    self.check_memory(lambda: {"prefill (state included)": memory.program_bytes(compiled)},
                      "use a smaller batch or max_length")
    return compiled(self.params, tables, prompt)

  def state_shape(self, batch: int, prompt_length: int) -> RolloutState:
    """The state after a prompt, as `jax.ShapeDtypeStruct`s (nothing runs)."""
    prompt = jax.ShapeDtypeStruct((batch, prompt_length, self.model.width), jnp.float32)
    return self.shapes(_prefill, dict(engine=self.engine(batch)), self.params,
                       self.abstract_tables(), prompt)[1]

  def estimate_memory(self, batch: int, prompt_length: int,
                      num_steps: int | None = None) -> dict[str, int]:
    """Bytes by XLA's analysis of the compiled programs (nothing runs): parameters, tables
    (unless built) with their computation, the prefill (state included) and `num_steps`."""
    prompt = jax.ShapeDtypeStruct((batch, prompt_length, self.model.width), jnp.float32)
    engine = self.engine(batch)
    tables = self.abstract_tables()
    parts = {"parameters": memory.tree_bytes(self.params), **self.table_parts(),
             "prefill (state included)": memory.program_bytes(
                 self.compiled(_PREFILL, dict(engine=engine), self.params, tables, prompt))}
    if num_steps is not None:
      parts["rollout"] = memory.program_bytes(self.compiled(
          self._run_program, dict(engine=engine, num_steps=num_steps), self.params, tables,
          self.state_shape(batch, prompt_length)))
    return parts

  def run(self, state: RolloutState, num_steps: int) -> tuple[Array, RolloutState]:
    """The next `num_steps` outputs (B, num_steps, D), each fed back as the next input."""
    position = int(jax.device_get(state.engine.position))
    if num_steps < 0 or position + num_steps > self.max_length:
      raise ValueError(f"cannot run {num_steps} steps after {position} positions: max_length "
                       f"is {self.max_length}.")
    static = dict(engine=self.engine(state.last.shape[0]), num_steps=int(num_steps))
    compiled = self.compiled(self._run_program, static, self.params, self.tables, state)
    self.check_memory(lambda: {"rollout": memory.program_bytes(compiled)},
                      "run fewer steps per call")
    return compiled(self.params, self.tables, state)


def rollout(params: Any, model: OnlineModel, prompt, num_steps: int, *,
            strategy: str = "flash", options: EngineOptions | None = None,
            distilled: Any = None, mesh: jax.sharding.Mesh | None = None,
            mesh_axes: tuple[str | None, str | None] = ("data", "model"),
            **engine_options) -> Array:
  """Runs `model` over `prompt` (B, P, D), P >= 1, then `num_steps` positions feeding each
  output back as the next input (on `mesh`, if given). Returns all outputs
  (B, P + num_steps, D)."""
  prompt = jnp.asarray(prompt, jnp.float32)
  if prompt.ndim != 3:
    raise ValueError(f"prompt must have shape (batch, length, {model.width}), got "
                     f"{prompt.shape}.")
  total = prompt.shape[1] + num_steps
  if total > model.max_length and distilled is None:
    raise ValueError(f"length {total} exceeds the model's max_length = {model.max_length}.")
  session = Rollout(params, model, strategy, total, options, distilled=distilled, mesh=mesh,
                    mesh_axes=mesh_axes, **engine_options)
  outputs, state = session.prefill(prompt)
  if not num_steps:
    return outputs
  rest, _ = session.run(state, num_steps)
  return jnp.concatenate([outputs, rest], axis=1)
