r"""Crossover table for the Toeplitz block: Pallas kernels vs XLA's direct and FFT paths per U.

For every block size U it times, on the default device, one block over all S streams, B batch
rows and D channels (inputs (U, S, B, D), taps (2U, S, D) -> float32 (U, S, B, D)) computed by

  pallas      pallas_kernels.toeplitz_block       (direct O(U^2) Pallas kernel)
  pallas_mxu  pallas_kernels.toeplitz_block_mxu   (blocked Toeplitz matmuls; TPU only compiled)
  direct      pallas_kernels.toeplitz_block_reference   (XLA: Toeplitz gather + einsum)
  fft         pallas_kernels.fft_block_reference  (XLA: rfft of size 2U, product, irfft)

each jitted, compiled ahead of time (compile time reported apart), run `warmup` times, then timed
`repeats` times with block_until_ready; the median is reported. Every method's output is also
compared with a baseline (the direct reference where it fits in memory, else the FFT path), so
on a device this doubles as a correctness check of the compiled kernels. A method that fails to
lower or compile on this backend is recorded under "errors" with the exception text, not fatal.

Output JSON (`--out`), read by the engine's tau="auto":
  {"backend", "device", "cpu_model", "jax_version", "interpret",
   "shape": {"streams", "batch", "channels", "dtype"}, "repeats", "warmup",
   "per_block_size": {"U": {method: median seconds or null}},
   "compile_seconds": {"U": {method: seconds}}, "max_rel_error": {"U": {method: float}},
   "errors": {"U": {method: "Type: message"}}, "best": {"U": method},
   "crossover": {"direct_max_U": int, "pallas_max_U": int, "pallas_mxu_max_U": int}}
where <method>_max_U is the largest U such that the method was measured and no slower than the
FFT path at every measured U' <= U (0 if it loses at the smallest U).

On a CPU host the Pallas kernels run in interpret mode (their timings are then meaningless; this
mode exists so tests can exercise the code): keep the sizes tiny there.

  python -m experiments.pallas_crossover --out=/tmp/crossover.json \
      --sizes=1,2,4,8,16,32,64,128,256,512,1024,2048,4096 --streams=8 --batch=1 --channels=512
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lib.blocks import crossover  # the crossover rule, shared with block_crossover
from lcsm_jax.tuning import machine
from lcsm_jax.tuning import timing
import pallas_kernels

METHODS = ("pallas", "pallas_mxu", "direct", "fft")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The runner's flags (defined by `__main__` only, as in the other runners)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out", None, "Path of the JSON crossover table to write.", **fv)
  flags.DEFINE_list("sizes", None, "Block sizes U (powers of two). Default: 1..4096 on an "
                    "accelerator, 1..8 on CPU.", **fv)
  flags.DEFINE_integer("streams", 8, "Streams S (layers x long convolutions per layer).", **fv)
  flags.DEFINE_integer("batch", 1, "Batch rows B.", **fv)
  flags.DEFINE_integer("channels", 256, "Channels D.", **fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation and tap dtype.",
                    **fv)
  flags.DEFINE_integer("repeats", 20, "Timed runs per method and size (median reported).", **fv)
  flags.DEFINE_integer("warmup", 3, "Untimed runs after compilation.", **fv)
  flags.DEFINE_list("kernels", list(METHODS), f"Methods to time, from {METHODS}.", **fv)
  flags.DEFINE_enum("interpret", "auto", ["auto", "true", "false"],
                    "Pallas interpret mode: auto = interpret on CPU only.", **fv)
  flags.DEFINE_integer("max_direct_bytes", 1 << 30, "Skip the XLA direct reference when its "
                       "explicit Toeplitz matrix (U^2 * S * D float32) would exceed this.", **fv)
  flags.DEFINE_integer("max_pallas_size", 8192, "Skip the direct Pallas kernel above this U "
                       "(its O(U^2) vector work makes large U pointless).", **fv)


def _method_fns(interpret: bool | None) -> dict[str, Callable]:
  return {
      "pallas": lambda x, w: pallas_kernels.toeplitz_block(x, w, interpret=interpret),
      "pallas_mxu": lambda x, w: pallas_kernels.toeplitz_block_mxu(x, w, interpret=interpret),
      "direct": pallas_kernels.toeplitz_block_reference,
      "fft": pallas_kernels.fft_block_reference,
  }


def time_compiled(fn: Callable, args: Sequence[jax.Array], warmup: int,
                  repeats: int) -> tuple[float, float, jax.Array]:
  """(median seconds per run, compile seconds, output) of jit(fn)(*args)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = compiled(*args)
  out.block_until_ready()
  seconds, _ = timing.median_seconds(lambda: compiled(*args), repeats, warmup)
  return seconds, compile_s, out


def _skip_reason(method: str, size: int, streams: int, channels: int, max_direct_bytes: int,
                 max_pallas_size: int) -> str | None:
  if method == "direct" and size * size * streams * channels * 4 > max_direct_bytes:
    return (f"skipped: the explicit Toeplitz matrix needs {size * size * streams * channels * 4}"
            f" bytes > --max_direct_bytes={max_direct_bytes}")
  if method == "pallas" and size > max_pallas_size:
    return f"skipped: U > --max_pallas_size={max_pallas_size}"
  return None


def run_crossover(sizes: Sequence[int], streams: int, batch: int, channels: int, dtype: str,
                  repeats: int, warmup: int, methods: Sequence[str], interpret: bool | None,
                  max_direct_bytes: int = 1 << 30, max_pallas_size: int = 8192) -> dict:
  """Measures every method at every size and returns the table (see the module docstring)."""
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}.")
  if "fft" not in methods:
    methods = list(methods) + ["fft"]  # the crossover is measured against it
  fns = _method_fns(interpret)
  device = jax.devices()[0]
  on_cpu = jax.default_backend() == "cpu"
  table: dict = {
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "cpu_model": machine.cpu_model(),
      "jax_version": jax.__version__,
      "interpret": bool(interpret) or (interpret is None and on_cpu),
      "shape": {"streams": streams, "batch": batch, "channels": channels, "dtype": dtype},
      "repeats": repeats,
      "warmup": warmup,
      "per_block_size": {},
      "compile_seconds": {},
      "max_rel_error": {},
      "errors": {},
      "best": {},
  }
  per_size: dict[int, dict[str, float | None]] = {}
  for size in sizes:
    if size < 1 or size & (size - 1):
      raise ValueError(f"block sizes must be powers of two; got {size}.")
    key_x, key_w = jax.random.split(jax.random.key(size))
    x = jax.random.normal(key_x, (size, streams, batch, channels), jnp.float32).astype(dtype)
    w = jax.random.normal(key_w, (2 * size, streams, channels), jnp.float32).astype(dtype)
    times, compiles, errors, outputs = {}, {}, {}, {}
    for method in methods:
      reason = _skip_reason(method, size, streams, channels, max_direct_bytes, max_pallas_size)
      if reason:
        times[method], errors[method] = None, reason
        continue
      try:
        times[method], compiles[method], outputs[method] = time_compiled(
            fns[method], (x, w), warmup, repeats)
      except Exception as e:  # pylint: disable=broad-except  (a backend that cannot lower it)
        times[method], errors[method] = None, f"{type(e).__name__}: {e}"[:2000]
    baseline = outputs.get("direct", outputs.get("fft"))
    scale = float(jnp.max(jnp.abs(baseline))) or 1.0
    rel = {m: float(jnp.max(jnp.abs(o - baseline))) / scale for m, o in outputs.items()}
    per_size[size] = times
    key = str(size)
    table["per_block_size"][key] = times
    table["compile_seconds"][key] = compiles
    table["max_rel_error"][key] = rel
    if errors:
      table["errors"][key] = errors
    measured = {m: t for m, t in times.items() if t is not None}
    table["best"][key] = min(measured, key=measured.get) if measured else None
  table["crossover"] = {f"{m}_max_U": crossover(per_size, m)
                        for m in ("direct", "pallas", "pallas_mxu")}
  return table


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flag_values
  if not f.out:
    raise app.UsageError("--out is required.")
  on_cpu = jax.default_backend() == "cpu"
  default_sizes = [1, 2, 4, 8] if on_cpu else [2 ** i for i in range(13)]
  sizes = [int(s) for s in f.sizes] if f.sizes else default_sizes
  interpret = {"auto": None, "true": True, "false": False}[f.interpret]
  table = run_crossover(sizes, f.streams, f.batch, f.channels, f.dtype,
                        f.repeats, f.warmup, f.kernels, interpret,
                        f.max_direct_bytes, f.max_pallas_size)
  path = pathlib.Path(f.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(table, indent=2, sort_keys=True, allow_nan=False))
  rows = [f"{'U':>6} " + " ".join(f"{m:>12}" for m in METHODS) + "  best"]
  for key, times in table["per_block_size"].items():
    cells = [f"{times[m] * 1e6:10.1f}us" if times.get(m) is not None else f"{'-':>12}"
             for m in METHODS]
    rows.append(f"{key:>6} " + " ".join(cells) + f"  {table['best'][key]}")
  print("\n".join(rows))
  print("crossover:", table["crossover"], "->", path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
