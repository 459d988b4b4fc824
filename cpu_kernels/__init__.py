"""C++ kernels for XLA:CPU through `jax.ffi`, built on first use (see each module).

  bf16_matmul(x, w)             x (..., K) float32 @ w (K, N) bfloat16 -> (..., N) float32,
                                reading the weights as bfloat16 (XLA:CPU reads a float32 copy)
  bf16_matmul_reference(x, w)   plain JAX: one dot_general with float32 accumulation
  available(), unavailable_reason()   whether the kernel could be built and registered here
  disabled(), enabled()         a tracing-time switch to keep XLA dots (on a device mesh)
"""

from cpu_kernels.bf16_matmul import available
from cpu_kernels.bf16_matmul import bf16_matmul
from cpu_kernels.bf16_matmul import unavailable_reason
from cpu_kernels.bf16_matmul_reference import bf16_matmul_reference
from cpu_kernels.switch import disabled
from cpu_kernels.switch import enabled

__all__ = [
    "available",
    "bf16_matmul",
    "bf16_matmul_reference",
    "disabled",
    "enabled",
    "unavailable_reason",
]
