"""What every `lcsm-*` command shares: argparse value types with one-line errors, and the entry
point's handling of errors, Ctrl-C and a closed stdout (`run_main`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence, TextIO, TypeVar

T = TypeVar("T")

# Exit codes (see `run_main`).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# The seeds jax.random.key(seed) accepts as a Python int (it converts to a C long and raises
# OverflowError outside this range; checked by the tests).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


# -- argparse value types. -------------------------------------------------------------------------

def int_at_least(low: int) -> Callable[[str], int]:
  """An argparse type: an integer >= `low`."""
  def parse(value: str) -> int:
    try:
      number = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
    return number
  return parse


def float_in(low: float, high: float, low_open: bool) -> Callable[[str], float]:
  """An argparse type: a finite number in [low, high] ((low, high] when `low_open`)."""
  def parse(value: str) -> float:
    try:
      number = float(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
      raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    if not (low < number if low_open else low <= number) or not number <= high:
      interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if high < math.inf else ')'}"
      raise argparse.ArgumentTypeError(f"must lie in {interval}, got {value}")
    return number
  return parse


def seed(value: str) -> int:
  """An argparse type: a PRNG seed that `jax.random.key` accepts."""
  try:
    number = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
  if not SEED_MIN <= number <= SEED_MAX:
    raise argparse.ArgumentTypeError(
        f"must lie in [-2**63, 2**63 - 1] = [{SEED_MIN}, {SEED_MAX}] (what jax.random.key "
        f"accepts), got {number}")
  return number


def from_parser(parse: Callable[[str], T]) -> Callable[[str], T]:
  """An argparse type from a parser of the library that raises ValueError: its message becomes
  argparse's (`argument --tau: tau must be one of ...`), not `invalid parse value`."""
  def convert(value: str) -> T:
    try:
      return parse(value)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return convert


MESH_AXES = ("data", "model")


def mesh_shape(value: str) -> tuple[tuple[str, int], ...]:
  """An argparse type: a device mesh `data=2,model=4` -> (("data", 2), ("model", 4)); the
  axes are 'data' (batch rows) and 'model' (channels), each at most once, sizes >= 1."""
  axes = []
  for part in value.split(","):
    name, sep, size = part.strip().partition("=")
    if not sep or name not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
      raise argparse.ArgumentTypeError(
          f"expected axis=size pairs separated by commas, the axes among {MESH_AXES} and the "
          f"sizes >= 1 (e.g. data=2,model=4), got {value!r}")
    if name in dict(axes):
      raise argparse.ArgumentTypeError(f"axis {name!r} given twice in {value!r}")
    axes.append((name, int(size)))
  return tuple(axes)


def set_host_devices(count: int) -> None:
  """Makes JAX's CPU backend expose `count` devices (`jax_num_cpu_devices`); must run before JAX
  starts its backends (ValueError otherwise)."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise ValueError(f"--host_devices {count}: JAX has already started ({e}).") from None


def make_mesh(axes: Sequence[tuple[str, int]]):
  """The `jax.sharding.Mesh` of `mesh_shape` axes over the first devices of `jax.devices()`
  (both axes present, a missing one of size 1). ValueError naming the numbers when there are
  not enough devices, with how to get more host CPU devices."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  sizes = dict(axes)
  shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
  needed, devices = math.prod(shape), jax.devices()
  if needed > len(devices):
    raise ValueError(
        f"--mesh {','.join(f'{n}={s}' for n, s in zip(MESH_AXES, shape))} needs {needed} "
        f"devices, but JAX sees {len(devices)} ({devices[0].platform}); on CPU, pass "
        f"--host_devices {needed} or set XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{needed} before the command starts.")
  return jax.sharding.Mesh(np.asarray(devices[:needed]).reshape(shape), MESH_AXES)


# -- The entry point. ------------------------------------------------------------------------------

def run_main(prog: str, parser: argparse.ArgumentParser,
             run: Callable[[argparse.Namespace, TextIO, TextIO], int],
             argv: Sequence[str] | None) -> int:
  """Parses `argv` (default sys.argv[1:]) and calls `run(args, sys.stdout, sys.stderr)`.

  Returns the exit code: `run`'s, or
    2: bad usage or input: argparse's usage and error, or one line `PROG: error: ...` on stderr
      for a ValueError or OSError from `run` (CheckpointError is a ValueError), no traceback.
    130 (128 + SIGINT): interrupted (Ctrl-C); `PROG: interrupted` on stderr. Called from the
      main thread, the process ends at once, by os._exit, without returning (see
      `ctrl_c_exits_at_once` for why).
    141 (128 + SIGPIPE): the reader of stdout went away (`PROG ... | head -c 10`): the command
      stops, nothing is printed on stderr. A shell reports the same status for a program killed
      by SIGPIPE (`yes | head`), so `set -o pipefail` treats both alike.
  """
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse printed usage and the error (or --help)
    return int(e.code or 0)
  try:
    with ctrl_c_exits_at_once(prog):
      return run(args, sys.stdout, sys.stderr)
  except BrokenPipeError:  # an OSError, but no error of the input: see the docstring
    _stdout_to_devnull()
    return EXIT_BROKEN_PIPE
  except (ValueError, OSError) as e:
    try:
      sys.stdout.flush()
    except BrokenPipeError:
      _stdout_to_devnull()
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:  # SIGINT just before the handler was installed
    print(f"\n{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _stdout_to_devnull() -> None:
  """Points the file descriptor of sys.stdout at /dev/null, so that the interpreter's final
  flush of text still buffered for a broken pipe does not raise BrokenPipeError again (the
  recipe of Python's documentation, "Note on SIGPIPE" in the `signal` module)."""
  try:
    fd = sys.stdout.fileno()
  except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured by a test)
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, fd)
  os.close(devnull)


def _exit_interrupted(prog: str) -> None:
  """Ends the process at once: `PROG: interrupted` on stderr, exit code 130."""
  try:  # straight to file descriptor 2: no lock of sys.stderr that another thread might hold
    os.write(2, f"\n{prog}: interrupted\n".encode())
  except OSError:
    pass
  os._exit(EXIT_INTERRUPTED)


def _watch_for_sigint(prog: str, read_fd: int) -> None:
  """Reads signal numbers written by Python's C-level signal handler (`signal.set_wakeup_fd`)
  until the pipe is closed; ends the process on SIGINT."""
  while data := os.read(read_fd, 64):
    if int(signal.SIGINT) in data:
      _exit_interrupted(prog)


@contextlib.contextmanager
def ctrl_c_exits_at_once(prog: str) -> Iterator[None]:
  """While active, SIGINT (Ctrl-C) ends the process at once with exit code 130, without the
  interpreter's shutdown. Does nothing outside the main thread (Python sets signal handlers
  only there, and delivers KeyboardInterrupt only there).

  Why (issue 12: Ctrl-C during the compilation of a long generation program crashed with
  `Fatal Python error: Segmentation fault`, every time): jaxlib compiles on a thread of XLA's
  thread pool while the main thread waits for it, polling for signals. Ctrl-C there raised
  KeyboardInterrupt in the main thread and `main` returned 130 while the compilation went on
  in the pool; the interpreter's shutdown then freed JAX's client (its devices, then it joins
  the pool), and the compilation, finishing, read a freed device (gdb: the pool thread in
  `ifrt::PjRtLoadedExecutable::Create` -> `SingleDeviceSharding::Create`, the main thread in
  `~PjRtClient` from `Py_FinalizeEx`). And while a compiled program runs, the main thread waits
  without polling for signals: the KeyboardInterrupt came only when the whole call was done.

  The fix: `os._exit` ends the process without that shutdown (no destructors run, so nothing
  can race with XLA's threads, which simply end with the process), and it is called from a
  watcher thread that Python's C-level signal handler wakes at once through
  `signal.set_wakeup_fd`, whatever the main thread is waiting on (XLA's waits release the
  GIL). The Python-level handler does nothing, so no KeyboardInterrupt unwinds the main thread
  in the meantime. Nothing written is lost as long as the command flushes stdout after every
  piece of output (stderr is line-buffered).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
  watcher = threading.Thread(target=_watch_for_sigint, args=(prog, read_fd), daemon=True,
                             name=f"{prog} SIGINT watcher")
  watcher.start()
  previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  try:
    yield
  finally:
    signal.set_wakeup_fd(previous_fd)
    signal.signal(signal.SIGINT,
                  previous_handler if previous_handler is not None else signal.SIG_DFL)
    os.close(write_fd)  # the watcher reads end-of-file and returns
    watcher.join()
    os.close(read_fd)
