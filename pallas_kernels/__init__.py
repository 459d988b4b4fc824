"""Pallas kernels for the Toeplitz block of the tiled generation schedule (see README.md).

  toeplitz_block(inputs, taps)             direct O(U^2) kernel (TPU, Triton, Mosaic GPU)
  toeplitz_block_mxu(inputs, taps)         blocked Toeplitz matmuls for large U (TPU)
  toeplitz_block_reference(inputs, taps)   plain JAX: explicit Toeplitz gather + einsum
  toeplitz_block_tiled_reference(...)      plain JAX: the MXU kernel's tile decomposition
  fft_block_reference(inputs, taps)        plain JAX: the FFT path (rfft of size 2U)

inputs (U, S, B, D), taps (2U, S, D) -> (U, S, B, D) float32,
out[j] = sum_k inputs[k] * taps[U + j - k] for every stream, batch row and channel.
"""

from pallas_kernels.toeplitz_block import toeplitz_block
from pallas_kernels.toeplitz_block_mxu import tile_size as mxu_tile_size
from pallas_kernels.toeplitz_block_mxu import toeplitz_block_mxu
from pallas_kernels.toeplitz_block_mxu_reference import toeplitz_block_tiled_reference
from pallas_kernels.toeplitz_block_reference import fft_block_reference
from pallas_kernels.toeplitz_block_reference import toeplitz_block_reference

__all__ = [
    "fft_block_reference",
    "mxu_tile_size",
    "toeplitz_block",
    "toeplitz_block_mxu",
    "toeplitz_block_reference",
    "toeplitz_block_tiled_reference",
]
