"""C++ kernels for XLA:CPU through `jax.ffi`, built on first use (see each module).

  bf16_matmul(x, w)             x (..., K) float32 @ w (K, N) bfloat16 -> (..., N) float32,
                                reading the weights as bfloat16 (XLA:CPU reads a float32 copy)
  bf16_matmul_reference(x, w)   plain JAX: one dot_general with float32 accumulation
  available(), unavailable_reason()   whether that kernel could be built and registered here
  modal_step(xr, xi, poles, residues, total, a) -> (xr', xi', y)
                                the 'modal' strategy's step: the state planes (S, B, H, D)
                                float32 updated in place in one pass, and the next pending
                                outputs y (S, B, D); XLA operations when its kernel is
                                unavailable (with a warning) or inside disabled()
  modal_step_reference(...)     plain JAX: the same formulas as XLA operations
  disabled(), enabled()         a tracing-time switch to keep XLA dots (on a device mesh)
  on_local_shards()             kernels enabled again inside disabled(), for the per-shard
                                functions of jax.shard_map
"""

from cpu_kernels.bf16_matmul import available
from cpu_kernels.bf16_matmul import bf16_matmul
from cpu_kernels.bf16_matmul import unavailable_reason
from cpu_kernels.bf16_matmul_reference import bf16_matmul_reference
from cpu_kernels.modal_step import modal_step
from cpu_kernels.modal_step_reference import modal_step_reference
from cpu_kernels.switch import disabled
from cpu_kernels.switch import enabled
from cpu_kernels.switch import on_local_shards

__all__ = [
    "available",
    "bf16_matmul",
    "bf16_matmul_reference",
    "disabled",
    "enabled",
    "modal_step",
    "modal_step_reference",
    "on_local_shards",
    "unavailable_reason",
]
