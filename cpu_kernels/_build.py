"""Builds a C++ XLA FFI source of this package into a shared library, once per machine.

The library lands in a per-user cache directory (`$LCSM_JAX_CACHE_DIR`, else
`~/.cache/lcsm_jax/`) under a name keyed by a hash of the source text, the jax version, the
compiler (its path and version line), the flags and the CPU (model name and feature flags from
/proc/cpuinfo, since `-march=native` compiles for this CPU). It is compiled to a temporary name
in that directory and moved into place with `os.replace`, so concurrent builders (pytest-xdist
workers, several processes) never load a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")
COMPILERS = ("c++", "g++")


class BuildError(RuntimeError):
  """The library could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> pathlib.Path:
  """`$LCSM_JAX_CACHE_DIR` or `~/.cache/lcsm_jax/`."""
  override = os.environ.get("LCSM_JAX_CACHE_DIR")
  return pathlib.Path(override) if override else pathlib.Path.home() / ".cache" / "lcsm_jax"


def find_compiler() -> str:
  """The path of the system C++ compiler (`c++`, else `g++`); BuildError if there is none."""
  for name in COMPILERS:
    path = shutil.which(name)
    if path:
      return path
  raise BuildError(f"no C++ compiler found on PATH (looked for {', '.join(COMPILERS)}).")


def _cpu_identity() -> str:
  """The CPU's model name and feature flags (what -march=native depends on); '' off Linux."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""
  keep = [line for line in text.splitlines()
          if line.split(":")[0].strip() in ("model name", "flags")]
  return "\n".join(keep[:2])


def _compiler_version(compiler: str) -> str:
  try:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError) as e:
    raise BuildError(f"{compiler} --version failed: {e}") from e
  return out.stdout.splitlines()[0] if out.stdout else ""


def build(source: pathlib.Path) -> pathlib.Path:
  """The shared library compiled from `source` (built on first use, then reused).

  Raises BuildError naming the compiler's output if it fails."""
  compiler = find_compiler()
  include = jax.ffi.include_dir()
  text = source.read_bytes()
  key = hashlib.sha256()
  for part in (text, jax.__version__.encode(), compiler.encode(),
               _compiler_version(compiler).encode(), " ".join(FLAGS).encode(),
               _cpu_identity().encode()):
    key.update(part)
    key.update(b"\0")
  directory = cache_dir()
  target = directory / f"{source.stem}-{key.hexdigest()[:16]}.so"
  if target.exists():
    return target
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise BuildError(f"cannot create the cache directory {directory}: {e}") from e
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
  os.close(fd)
  command = [compiler, *FLAGS, f"-I{include}", str(source), "-o", tmp]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
      raise BuildError(f"compiling {source.name} failed ({' '.join(command)}):\n"
                       f"{result.stderr.strip()[-4000:]}")
    os.replace(tmp, target)
  except (OSError, subprocess.SubprocessError) as e:
    raise BuildError(f"compiling {source.name} failed ({' '.join(command)}): {e}") from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target
