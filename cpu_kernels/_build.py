"""Builds a C++ XLA FFI source of this package into a shared library, once per machine.

The library lands in a per-user cache directory (`$LCSM_JAX_CACHE_DIR`, else
`~/.cache/lcsm_jax/`) under a name keyed by a hash of the source text, the jax version, the
compiler (its path and version line), the flags and the CPU (model name and feature flags from
/proc/cpuinfo, since `-march=native` compiles for this CPU). It is compiled to a temporary name
in that directory and moved into place with `os.replace`, so concurrent builders (pytest-xdist
workers, several processes) never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

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


class Kernel:
  """One C++ FFI source of this package, built, loaded and registered as the CPU target
  `target` (its exported `symbol`) on first use, once per process; the outcome is kept in
  `state` ("ok", "reason" why not, "lib", "path")."""

  def __init__(self, source: pathlib.Path, target: str, symbol: str):
    self.source, self.target, self.symbol = source, target, symbol
    self.state: dict = {}
    self._lock = threading.Lock()

  def register(self) -> None:
    with self._lock:
      if "ok" in self.state:
        return
      try:
        path = build(self.source)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(self.target, jax.ffi.pycapsule(getattr(lib, self.symbol)),
                                    platform="cpu")
      except Exception as e:  # pylint: disable=broad-except
        self.state.update(ok=False, reason=f"{type(e).__name__}: {e}")
      else:
        self.state.update(ok=True, reason="", lib=lib, path=path)

  def available(self) -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    self.register()
    return self.state["ok"]

  def unavailable_reason(self) -> str:
    """Why `available()` is False ('' when it is True)."""
    self.register()
    return self.state["reason"]

  def library_path(self) -> pathlib.Path | None:
    """The loaded shared library (None when unavailable)."""
    self.register()
    return self.state.get("path")
