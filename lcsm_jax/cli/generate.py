"""`lcsm-generate`: sample from the shipped byte-level model or a HyenaDNA checkpoint.

  lcsm-generate --prompt "def parse_args(argv):" --num_tokens 200 --temperature 0.8
  lcsm-generate --num_tokens 1000 --compare_lazy
  lcsm-generate --checkpoint path/to/hyenadna --prompt ACGTACGT --num_tokens 500

The text goes to stdout as it is generated; timings, progress and errors go to stderr. The
sequence is generated in chunks of `--chunk_tokens` tokens, one jitted `generate` call per
chunk whose prompt is everything so far (the prompt is prefilled by one parallel forward, so
this costs little), with the Gumbel noise of every step taken from `fold_in(key, step)` as one
`generate` call would: the chunked text is exactly the text of a single call with the same
seed. Each chunk shape compiles once; compile time is reported apart from generation time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax import engine
from lcsm_jax import generation
from lcsm_jax import sampling
from lcsm_jax.io.detect import load_checkpoint
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.text import Tokenizer, tokenizer_for
from lcsm_jax.tuning.timing import CompileTimer

PROG = "lcsm-generate"
DEFAULT_CHUNK_TOKENS = 256
TAU_NAMES = ("auto", "direct", "fft", "pallas")
# The seeds jax.random.key(seed) accepts as a Python int (it converts to a C long and raises
# OverflowError outside this range; checked by the tests).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1
# Exit codes (see `main`).
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


# -- Chunked, exact generation with timing. --------------------------------------------------------

@dataclasses.dataclass
class GenerationStats:
  """Totals of one chunked generation: tokens, `generate` calls, and seconds spent compiling
  (JAX's recorded tracing, lowering and compilation) and generating (the rest)."""

  strategy: str
  tokens: int = 0
  calls: int = 0
  compile_s: float = 0.0
  run_s: float = 0.0

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.run_s if self.run_s > 0 else float("inf")

  def summary(self) -> str:
    calls = f"{self.calls} call" + ("s" if self.calls != 1 else "")
    return (f"{self.strategy}: {self.tokens} tokens in {self.run_s:.3f} s = "
            f"{self.tokens_per_s:.0f} tokens/s ({calls}; compile {self.compile_s:.1f} s, "
            "not counted)")


@functools.partial(jax.jit, static_argnames=("num", "vocab_size"))
def _step_noise(key: jax.Array, start: jax.Array, *, num: int, vocab_size: int) -> jax.Array:
  """Gumbel noise (1, num, vocab_size) of generation steps start .. start + num - 1, exactly as
  `generate` draws it for those steps from `key`."""
  steps = start + jnp.arange(num)
  noise = jax.vmap(lambda s: sampling.step_noise(sampling.row_keys(key, 1), s, vocab_size))(steps)
  return jnp.swapaxes(noise, 0, 1)


def _warm_autotune(config: HyenaConfig, strategy: str, tau: str | int) -> None:
  """Resolves tau='auto' (measuring the direct/FFT crossover if this machine has no cached
  one) before anything is timed. Channels as the engine counts them for a batch of one."""
  if strategy == "flash" and tau == "auto":
    from lcsm_jax.tuning import crossover as crossover_lib
    crossover_lib.crossover(config.num_streams * config.d_model)


def check_request(config: HyenaConfig, prompt_ids: np.ndarray, num_tokens: int,
                  chunk_tokens: int) -> None:
  """Raises ValueError unless a prompt of ids (P,) and `num_tokens` fit the model."""
  if np.size(prompt_ids) == 0:
    raise ValueError("the prompt is empty; generation needs at least one prompt token.")
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}.")
  total = np.size(prompt_ids) + num_tokens - 1
  if total > config.l_max:
    raise ValueError(
        f"the prompt ({np.size(prompt_ids)} tokens) and {num_tokens} new tokens need "
        f"{total} positions, more than the model's maximum length l_max = {config.l_max}; "
        "shorten the prompt or ask for fewer tokens.")
  if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
    raise ValueError(f"chunk_tokens must be an integer >= 0 (0: one call), got {chunk_tokens!r}.")


def generate_chunks(params: Any, config: HyenaConfig, prompt_ids: np.ndarray, num_tokens: int,
                    seed: int, *, chunk_tokens: int, strategy: str = "flash",
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, tau: str | int = "auto",
                    check_memory: bool = True,
                    stats: GenerationStats | None = None) -> Iterator[np.ndarray]:
  """Yields the `num_tokens` tokens after `prompt_ids` (P,) in chunks of ids (<= chunk_tokens,).

  Every chunk is one `generation.generate` call whose prompt is the prompt plus all tokens so
  far and whose noise is that of the same steps of one call with `jax.random.key(seed)`, so
  the concatenated chunks equal `generate(..., num_tokens, jax.random.key(seed)).tokens[0]`.
  chunk_tokens 0 means one call. `stats` (if given) accumulates tokens, calls and timings.

  Raises:
    ValueError: a prompt that does not fit `config.l_max` with `num_tokens`, bad sampling
      options (from `generate`).
  """
  prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
  check_request(config, prompt_ids, num_tokens, chunk_tokens)
  chunk_tokens = chunk_tokens or num_tokens
  stats = stats if stats is not None else GenerationStats(strategy)
  key = jax.random.key(seed)
  greedy = temperature == 0
  _warm_autotune(config, strategy, tau)
  ids = prompt_ids
  for start in range(0, num_tokens, chunk_tokens):
    num = min(chunk_tokens, num_tokens - start)
    with CompileTimer() as timer:
      began = time.perf_counter()
      noise = None if greedy else _step_noise(key, jnp.int32(start), num=num,
                                              vocab_size=config.vocab_size)
      out = generation.generate(params, config, ids[None], num, key, strategy=strategy,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                gumbel_noise=noise, tau=tau, check_memory=check_memory)
      chunk = np.asarray(out.tokens[0])
      elapsed = time.perf_counter() - began
    stats.calls += 1
    stats.tokens += num
    stats.compile_s += timer.seconds
    stats.run_s += max(elapsed - timer.seconds, 0.0)
    ids = np.concatenate([ids, chunk])
    yield chunk


# -- The command. ----------------------------------------------------------------------------------

def _int_at_least(low: int) -> Callable[[str], int]:
  def parse(value: str) -> int:
    try:
      number = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
    return number
  return parse


def _float_in(low: float, high: float, low_open: bool) -> Callable[[str], float]:
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


def _seed(value: str) -> int:
  try:
    seed = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
  if not SEED_MIN <= seed <= SEED_MAX:
    raise argparse.ArgumentTypeError(
        f"must lie in [-2**63, 2**63 - 1] = [{SEED_MIN}, {SEED_MAX}] (what jax.random.key "
        f"accepts), got {seed}")
  return seed


def _tau(value: str) -> str | int:
  if value in TAU_NAMES:
    return value
  try:
    tau = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(TAU_NAMES)} or an integer block size, got {value!r}") from None
  if tau < 0:
    raise argparse.ArgumentTypeError(f"an integer tau must be >= 0, got {tau}")
  return tau


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description="Exact, fast sampling from a Hyena language model: the shipped "
      "byte-level model by default, or a HyenaDNA checkpoint. Text goes to stdout as it is "
      "generated; timings and errors go to stderr.")
  parser.add_argument("--checkpoint", metavar="PATH", default=None,
                      help="HyenaDNA checkpoint (a directory with config.json and weights, or "
                      "a weight file beside config.json), or a directory written by "
                      "lcsm_jax.save_params. Default: the shipped byte-level LM.")
  parser.add_argument("--prompt", default=None,
                      help="Prompt text (default: 'def ' for bytes, 'ACGT' for DNA). HyenaDNA "
                      "prompts may hold only A, C, G, T, N.")
  parser.add_argument("--num_tokens", type=_int_at_least(1), default=200,
                      help="Tokens to generate.")
  parser.add_argument("--temperature", type=_float_in(0.0, math.inf, False), default=0.8,
                      help="Sampling temperature; 0 is greedy.")
  parser.add_argument("--top_k", type=_int_at_least(1), default=40,
                      help="Sample among the k most likely.")
  parser.add_argument("--top_p", type=_float_in(0.0, 1.0, True), default=None,
                      help="Sample among the smallest set of probability >= top_p.")
  parser.add_argument("--seed", type=_seed, default=0,
                      help="PRNG seed (jax.random.key(seed)): an integer in [-2**63, 2**63 - 1], "
                      "the range jax.random.key accepts. Without 64-bit JAX (JAX_ENABLE_X64) "
                      "only its low 32 bits count: seeds that differ by a multiple of 2**32 "
                      "give the same text.")
  parser.add_argument("--strategy", choices=engine.STRATEGIES, default="flash",
                      help="Exact generation strategy (all give the same text).")
  parser.add_argument("--tau", type=_tau, default="auto",
                      help="Flash block implementation: auto, direct, fft, pallas, or an "
                      "integer crossover (direct for blocks <= tau).")
  parser.add_argument("--chunk_tokens", type=_int_at_least(0), default=DEFAULT_CHUNK_TOKENS,
                      help="Tokens per generate call, printed as each call returns (each "
                      "new chunk shape compiles once); 0: one call.")
  parser.add_argument("--no_memory_check", action="store_true",
                      help="Run even when the estimated memory exceeds what this machine has "
                      "free (by default such a run is refused before it starts).")
  parser.add_argument("--compare_lazy", action="store_true",
                      help="Also generate with the lazy strategy and the same seed; report "
                      "whether the text is identical and the speed-up.")
  return parser


def _generate_and_print(args: argparse.Namespace, params: Any, config: HyenaConfig,
                        tokenizer: Tokenizer, prompt_ids: np.ndarray, strategy: str,
                        out: TextIO | None, err: TextIO) -> tuple[np.ndarray, GenerationStats]:
  """Runs `generate_chunks`; writes the prompt and the text to `out` (None: silent), progress
  to `err` when `out` is not a terminal and there are several chunks. The prompt is written with
  the first chunk, so that a run refused before it starts (memory) prints nothing on `out`."""
  stats = GenerationStats(strategy)
  decode = tokenizer.decoder()
  head = tokenizer.decoder()(prompt_ids, True)
  chunks = []
  num_chunks = -(-args.num_tokens // (args.chunk_tokens or args.num_tokens))
  progress = out is not None and num_chunks > 1 and not out.isatty()
  for chunk in generate_chunks(params, config, prompt_ids, args.num_tokens, args.seed,
                               chunk_tokens=args.chunk_tokens, strategy=strategy,
                               temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, tau=args.tau,
                               check_memory=not args.no_memory_check, stats=stats):
    chunks.append(chunk)
    if out is not None:
      out.write(head + decode(chunk, False))
      out.flush()
      head = ""
    if progress:
      print(f"[{strategy}: {stats.tokens}/{args.num_tokens} tokens, "
            f"{stats.run_s + stats.compile_s:.1f} s]", file=err, flush=True)
  if out is not None:
    out.write(decode(np.zeros((0,), np.int32), True) + "\n")
    out.flush()
  return np.concatenate(chunks), stats


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
  """Loads the model, streams the text to `out`, reports to `err`. Returns the exit code."""
  config, params, description = load_checkpoint(args.checkpoint)
  tokenizer = tokenizer_for(config)
  prompt = tokenizer.default_prompt if args.prompt is None else args.prompt
  prompt_ids = tokenizer.encode(prompt)
  check_request(config, prompt_ids, args.num_tokens, args.chunk_tokens)
  print(f"{PROG}: {description} (vocabulary {config.vocab_size}, {tokenizer.name}, "
        f"l_max {config.l_max}); strategy {args.strategy}, seed {args.seed}", file=err,
        flush=True)
  tokens, stats = _generate_and_print(args, params, config, tokenizer, prompt_ids,
                                      args.strategy, out, err)
  print(stats.summary(), file=err)
  if not args.compare_lazy:
    return 0
  if args.strategy == "lazy":
    print("--compare_lazy: the strategy is already lazy; nothing to compare.", file=err)
    return 0
  lazy_tokens, lazy_stats = _generate_and_print(args, params, config, tokenizer, prompt_ids,
                                                "lazy", None, err)
  print(lazy_stats.summary(), file=err)
  identical = np.array_equal(tokens, lazy_tokens)
  speedup = lazy_stats.run_s / stats.run_s if stats.run_s > 0 else float("inf")
  print(f"lazy text identical to {args.strategy}: {'yes' if identical else 'NO'}; "
        f"{args.strategy} speed-up over lazy: {speedup:.2f}x (compile time not counted)",
        file=err)
  return 0 if identical else 1


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


def _exit_interrupted() -> None:
  """Ends the process at once: `lcsm-generate: interrupted` on stderr, exit code 130."""
  try:  # straight to file descriptor 2: no lock of sys.stderr that another thread might hold
    os.write(2, f"\n{PROG}: interrupted\n".encode())
  except OSError:
    pass
  os._exit(EXIT_INTERRUPTED)


def _watch_for_sigint(read_fd: int) -> None:
  """Reads signal numbers written by Python's C-level signal handler (`signal.set_wakeup_fd`)
  until the pipe is closed; ends the process on SIGINT."""
  while data := os.read(read_fd, 64):
    if int(signal.SIGINT) in data:
      _exit_interrupted()


@contextlib.contextmanager
def _ctrl_c_exits_at_once() -> Iterator[None]:
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
  in the meantime. Nothing written is lost: stdout is flushed after every chunk, and stderr is
  line-buffered.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
  watcher = threading.Thread(target=_watch_for_sigint, args=(read_fd,), daemon=True,
                             name=f"{PROG} SIGINT watcher")
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


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `lcsm-generate`; `argv` without the program name (default sys.argv[1:]).

  Returns the exit code:
    0: success.
    1: --compare_lazy found different text.
    2: bad usage or input: one line `lcsm-generate: error: ...` on stderr, no traceback
      (options, the seed's range included, are checked before anything goes to stdout).
    130 (128 + SIGINT): interrupted (Ctrl-C); `lcsm-generate: interrupted` on stderr. Called
      from the main thread, the process ends at once, by os._exit, without returning (see
      `_ctrl_c_exits_at_once` for why).
    141 (128 + SIGPIPE): the reader of stdout went away (`lcsm-generate ... | head -c 10`):
      generation stops, nothing is printed on stderr. A shell reports the same status for a
      program killed by SIGPIPE (`yes | head`), so `set -o pipefail` treats both alike.
  """
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse printed usage and the error (or --help)
    return int(e.code or 0)
  try:
    with _ctrl_c_exits_at_once():
      return run(args, sys.stdout, sys.stderr)
  except BrokenPipeError:  # an OSError, but no error of the input: see the docstring
    _stdout_to_devnull()
    return EXIT_BROKEN_PIPE
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    try:
      sys.stdout.flush()
    except BrokenPipeError:
      _stdout_to_devnull()
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # SIGINT just before the handler was installed
    print(f"\n{PROG}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
  sys.exit(main())
