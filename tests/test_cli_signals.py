"""`lcsm-generate` as a real process: a reader that closes the pipe, and Ctrl-C (SIGINT) while
XLA compiles or runs the long generation program.

The interrupts are timed from JAX's own compile log (JAX_LOG_COMPILES=1 on stderr), not from
fixed sleeps: "Finished jaxpr to MLIR module conversion jit(_generate)" is logged just before
XLA starts compiling the generation program (several seconds on this CPU), and "Finished XLA
compilation of jit(_generate)" just before it runs (`--strategy recompute` at 1020 tokens: a
single call of about 15 s).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parent.parent
LONG_CALL = ["--num_tokens", "1020", "--strategy", "recompute", "--chunk_tokens", "0",
             "--temperature", "0"]
COMPILING = "Finished jaxpr to MLIR module conversion jit(_generate)"
RUNNING = "Finished XLA compilation of jit(_generate)"


def _start(*argv, log_compiles=False):
  # PYTHONFAULTHANDLER: a crash prints "Fatal Python error: Segmentation fault" and the stacks.
  env = dict(os.environ, JAX_LOG_COMPILES="1" if log_compiles else "0", PYTHONFAULTHANDLER="1")
  return subprocess.Popen([sys.executable, "-m", "lcsm_jax.cli", *argv], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def _stderr_until(proc, marker, timeout):
  """Reads stderr lines until one holds `marker`; returns the lines read."""
  lines = []
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stderr.readline().decode(errors="replace")
    if not line:
      break  # the process closed stderr (it ended)
    lines.append(line)
    if marker in line:
      return lines
  proc.kill()
  pytest.fail(f"no {marker!r} on stderr within {timeout} s; stderr so far ends:\n"
              f"{''.join(lines)[-3000:]}")


def _finish(proc, timeout):
  """(return code, stdout bytes, stderr text) of a process that should end within `timeout`."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"still running {timeout} s later; stderr ends:\n"
                f"{err.decode(errors='replace')[-3000:]}")
  return proc.returncode, out, err.decode(errors="replace")


def test_broken_pipe_exits_quietly_with_141():
  """`lcsm-generate ... | head -c 10`: the reader goes away after 10 bytes; the next chunk's
  write fails with EPIPE. Exit 128 + SIGPIPE, nothing on stderr but the usual reports."""
  proc = _start("--num_tokens", "400", "--chunk_tokens", "50", "--temperature", "0")
  try:
    received = b""
    while len(received) < 10:
      data = os.read(proc.stdout.fileno(), 10 - len(received))
      assert data, "stdout closed before 10 bytes"
      received += data
    proc.stdout.close()
    code, _, err = _finish(proc, timeout=120)
  finally:
    proc.kill()
  assert received.startswith(b"def ")
  assert code == 141, err
  assert "Traceback" not in err and "error:" not in err and "Exception" not in err, err
  assert "lcsm-generate: the shipped byte-level LM" in err  # it did run until the pipe broke
  assert "400/400 tokens" not in err  # and stopped there


@pytest.mark.parametrize("phase, marker", [("compiling", COMPILING), ("running", RUNNING)])
def test_ctrl_c_during_the_long_call_exits_130_at_once(phase, marker):
  """SIGINT while XLA compiles the generation program used to leave that compilation running
  on XLA's thread pool while the interpreter shut down, and crash (`Fatal Python error:
  Segmentation fault`); SIGINT while the program runs used to wait for the whole call."""
  proc = _start(*LONG_CALL, log_compiles=True)
  try:
    lines = _stderr_until(proc, marker, timeout=120)
    time.sleep(1.0)  # well inside the compilation (~6 s) or the run (~15 s)
    assert proc.poll() is None, "the long call ended before the signal"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code, out, err = _finish(proc, timeout=60)
    took = time.monotonic() - sent
  finally:
    proc.kill()
  err = "".join(lines) + err
  tail = err[-3000:]
  assert "Fatal Python error" not in err and "Segmentation fault" not in err, tail
  assert code == 130, tail
  assert err.rstrip().endswith("lcsm-generate: interrupted"), tail
  assert "Traceback" not in err, tail
  assert out == b""  # the prompt is printed with the first chunk; no chunk was finished
  # At once, not after the call: the rest of the compilation or run takes several seconds.
  assert took < 3.0, f"{phase}: exited {took:.1f} s after SIGINT"
