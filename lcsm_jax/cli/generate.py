"""`lcsm-generate`: sample from the shipped byte-level model or a HyenaDNA checkpoint.

  lcsm-generate --prompt "def parse_args(argv):" --num_tokens 200 --temperature 0.8
  lcsm-generate --num_tokens 1000 --compare_lazy
  lcsm-generate --checkpoint path/to/hyenadna --prompt ACGTACGT --num_tokens 500
  lcsm-generate --checkpoint distilled_dir --num_tokens 300 --compare_exact
  lcsm-generate --host_devices 8 --mesh data=2,model=4 --num_tokens 200

The text goes to stdout as it is generated; timings, progress and errors go to stderr. One
`lcsm_jax.Decoder` prefills the prompt, then continues its state by `--chunk_tokens` tokens per
`generate` call, printing each chunk as the call returns. A token's sampling noise comes from
its absolute step, so the chunked text is exactly the text of a single call with the same
seed. The filter tables are computed once per run; the full chunks share one compiled program,
a shorter last chunk compiles its own. Compile time is reported apart from generation time.

A checkpoint directory holding distilled filters (`lcsm-distill`, `io.native.has_distilled`)
runs the approximate 'modal' strategy on them unless `--strategy` names another one (the exact
strategies run on the original filters); modal may generate past the model's l_max.
`--compare_exact` then also runs flash with the same seed and reports the agreement on one
line: the tokens equal until the first difference, and the mean per-step KL(exact || modal)
of the next-token distributions along the modal text (`compare_exact`).

`--mesh data=2,model=4` generates on a device mesh (`lcsm_jax.Decoder(mesh=...)`): channels
split over the model axis; the one prompt is repeated over the data axis (the copies are
computed and dropped: row 0, whose tokens are those of one device, is printed). On CPU,
`--host_devices N` (or XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment)
makes JAX expose N host devices; a mesh larger than the devices JAX sees is an error (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator, Sequence, TextIO

import jax
import numpy as np

import lcsm_jax
from lcsm_jax.cli import common
from lcsm_jax.decoding import EXACT_STRATEGIES, STRATEGIES
from lcsm_jax.decoding.options import parse_tau
from lcsm_jax.decoding.strategies import strategy_class
from lcsm_jax.io import has_distilled, load_checkpoint, load_distilled
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.text import Tokenizer, tokenizer_for
from lcsm_jax.tuning import scheduler
from lcsm_jax.tuning.timing import CompileTimer

PROG = "lcsm-generate"
DEFAULT_CHUNK_TOKENS = 256
EXIT_MISMATCH = 1  # --compare_lazy found different text
EXACT_REFERENCE = "flash"  # the exact strategy --compare_exact runs


# -- Chunked, exact generation with timing. --------------------------------------------------------

@dataclasses.dataclass
class GenerationStats:
  """Totals of one chunked generation: tokens, `generate` calls, and seconds spent compiling
  (JAX's recorded tracing, lowering and compilation, the memory check's included) and
  generating (the rest of the prefill and the `generate` calls, filter tables included)."""

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

  @contextlib.contextmanager
  def timing(self) -> Iterator[None]:
    """Adds the time spent inside to `compile_s` (JAX's compile events) and `run_s` (the
    rest)."""
    with CompileTimer() as timer:
      began = time.perf_counter()
      yield
      elapsed = time.perf_counter() - began
    self.compile_s += timer.seconds
    self.run_s += max(elapsed - timer.seconds, 0.0)


def check_lengths(config: HyenaConfig, prompt_ids: np.ndarray, num_tokens: int,
                  chunk_tokens: int, strategy: str = "flash") -> None:
  """Raises ValueError unless a prompt of ids (P,) and `num_tokens` fit the model: P + num_tokens
  - 1 <= l_max, or for an `unbounded` strategy (modal, whose recurrence is defined for every
  t) only P <= l_max (the prompt's parallel prefill)."""
  if np.size(prompt_ids) == 0:
    raise ValueError("the prompt is empty; generation needs at least one prompt token.")
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}.")
  total = np.size(prompt_ids) + num_tokens - 1
  if strategy_class(strategy).unbounded:
    if np.size(prompt_ids) > config.l_max:
      raise ValueError(
          f"the prompt has {np.size(prompt_ids)} tokens, more than the model's maximum length "
          f"l_max = {config.l_max} (its parallel prefill; generation may go further with "
          f"{strategy}); shorten the prompt.")
  elif total > config.l_max:
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
                    check_memory: bool = True, distilled: Any = None,
                    stats: GenerationStats | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    step_weights: str = "float32", smooth: bool | int | str = "auto"
                    ) -> Iterator[np.ndarray]:
  """Yields the `num_tokens` tokens after `prompt_ids` (P,) in chunks of ids (<= chunk_tokens,).

  One `lcsm_jax.Decoder` sized for P + num_tokens - 1 positions prefills the prompt; every
  chunk is one `Decoder.generate` call continuing the state of the previous one with the key
  `jax.random.key(seed)`, so the concatenated chunks equal
  `lcsm_jax.generate(..., num_tokens, jax.random.key(seed)).tokens[0]`. chunk_tokens 0 means
  one call. The run's memory is checked before the first chunk (so before anything is
  printed). `distilled` (`lcsm_jax.distill` or `io.load_distilled`) is what strategy 'modal'
  runs on; modal may go past `config.l_max`. `stats` (if given) accumulates tokens, calls
  and timings; resolving tau='auto' (measuring this machine's crossover once, if not cached)
  is not timed. The memory check compiles the program the full chunks then run. On a `mesh`
  (axes 'data' and 'model'), the prompt is repeated over the data axis and row 0 is yielded
  (the same tokens as on one device). `step_weights` ('float32' or 'bfloat16'): the dtype the
  step reads its dense kernels in (`lcsm_jax.Decoder`). `smooth`: flash's smoothed schedule
  (`EngineOptions.smooth`).

  Raises:
    ValueError: a prompt that does not fit `config.l_max` with `num_tokens`, bad sampling
      options, a run whose estimated memory exceeds what is available
      (`lcsm_jax.InsufficientMemoryError`).
  """
  prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
  check_lengths(config, prompt_ids, num_tokens, chunk_tokens, strategy)
  chunk_tokens = min(chunk_tokens or num_tokens, num_tokens)
  stats = stats if stats is not None else GenerationStats(strategy)
  if temperature == 0:  # greedy decoding ignores top_k and top_p
    top_k = top_p = None
  decoder = lcsm_jax.Decoder(params, config, strategy, max_length=prompt_ids.size + num_tokens - 1,
                             tau=tau, check_memory=check_memory, donate_state=True,
                             distilled=distilled, mesh=mesh, step_weights=step_weights,
                             smooth=smooth)
  rows = 1 if mesh is None else int(mesh.shape["data"])
  decoder.engine(rows)  # resolves tau='auto' now, outside the timings
  with CompileTimer() as timer:  # the memory of the run's largest call, a full chunk
    decoder.check_request(rows, prompt_ids.size, chunk_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p,
                          advice="ask for fewer tokens or use a shorter prompt")
  stats.compile_s += timer.seconds
  key = jax.random.key(seed)
  with stats.timing():
    state = decoder.prefill(np.repeat(prompt_ids[None], rows, axis=0))
  for start in range(0, num_tokens, chunk_tokens):
    num = min(chunk_tokens, num_tokens - start)
    with stats.timing():
      out, state = decoder.generate(state, num, key, temperature=temperature, top_k=top_k,
                                    top_p=top_p)
      chunk = np.asarray(out.tokens[0])
    stats.calls += 1
    stats.tokens += num
    yield chunk


# -- The command. ----------------------------------------------------------------------------------

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
  parser.add_argument("--num_tokens", type=common.int_at_least(1), default=200,
                      help="Tokens to generate.")
  parser.add_argument("--temperature", type=common.float_in(0.0, math.inf, False), default=0.8,
                      help="Sampling temperature; 0 is greedy.")
  parser.add_argument("--top_k", type=common.int_at_least(1), default=40,
                      help="Sample among the k most likely.")
  parser.add_argument("--top_p", type=common.float_in(0.0, 1.0, True), default=None,
                      help="Sample among the smallest set of probability >= top_p.")
  parser.add_argument("--seed", type=common.seed, default=0,
                      help="PRNG seed (jax.random.key(seed)): an integer in [-2**63, 2**63 - 1], "
                      "the range jax.random.key accepts. Without 64-bit JAX (JAX_ENABLE_X64) "
                      "only its low 32 bits count: seeds that differ by a multiple of 2**32 "
                      "give the same text.")
  parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                      help="Generation strategy. The exact ones (" + ", ".join(EXACT_STRATEGIES)
                      + ") all give the same text, on the original filters; 'modal' runs the "
                      "distilled filters of a --checkpoint directory written by lcsm-distill "
                      "(approximate, constant memory per token, may go past l_max). Default: "
                      "modal for such a directory, flash otherwise.")
  parser.add_argument("--tau", type=common.from_parser(parse_tau), default="auto",
                      help="Flash block implementation: auto, direct, fft, pallas, or an "
                      "integer crossover (direct for blocks <= tau).")
  parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default="auto",
                      help="Flash: spread each large block's work over the steps before its "
                      "outputs are due, so that no token waits for a whole block (a steadier "
                      "rate per token; README, 'Smoothed latency'): --smooth smooths the levels "
                      "above 16 positions, --no-smooth keeps the plain tiling. Default: the "
                      "levels above 64 positions when XLA:CPU's concurrency-optimized "
                      "scheduler is off, which this command makes it for its run unless "
                      "XLA_FLAGS sets it (EngineOptions.smooth='auto').")
  parser.add_argument("--step_weights", choices=("float32", "bfloat16"), default="float32",
                      help="The dtype the one-token step reads its dense weights in. bfloat16 "
                      "samples from the model with those weights rounded to bfloat16 (an "
                      "approximation; activations, accumulation and state stay float32); it "
                      "halves the weight bytes per token on backends with bfloat16 matmuls, "
                      "not on XLA:CPU, which converts them to float32 once per call.")
  parser.add_argument("--chunk_tokens", type=common.int_at_least(0), default=DEFAULT_CHUNK_TOKENS,
                      help="Tokens per generate call, printed as each call returns (the "
                      "decoder's state is continued; each distinct chunk size compiles once); "
                      "0: one call.")
  parser.add_argument("--mesh", type=common.mesh_shape, default=None,
                      help="Generate on a device mesh, e.g. data=2,model=4: channels split over "
                      "the model axis (it must divide d_model), the prompt repeated over the "
                      "data axis (row 0 printed). Needs data x model devices (--host_devices).")
  parser.add_argument("--host_devices", type=common.int_at_least(1), default=None,
                      help="Make JAX's CPU backend expose this many devices (jax_num_cpu_devices;"
                      " the same as XLA_FLAGS=--xla_force_host_platform_device_count=N).")
  parser.add_argument("--no_memory_check", action="store_true",
                      help="Run even when the estimated memory exceeds what this machine has "
                      "free (by default such a run is refused before it starts).")
  parser.add_argument("--compare_lazy", action="store_true",
                      help="Also generate with the lazy strategy and the same seed; report "
                      "whether the text is identical and the speed-up (exact strategies "
                      "only).")
  parser.add_argument("--compare_exact", action="store_true",
                      help="With modal: also generate exactly (flash, same seed and options) "
                      "and report on one line the tokens equal until the first difference and "
                      "the mean per-step KL(exact || modal) of the next-token distributions "
                      "along the modal text (softmax of the logits at temperature 1).")
  return parser


def _generate_and_print(args: argparse.Namespace, params: Any, config: HyenaConfig,
                        tokenizer: Tokenizer, prompt_ids: np.ndarray, strategy: str,
                        out: TextIO | None, err: TextIO, distilled: Any = None
                        ) -> tuple[np.ndarray, GenerationStats]:
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
                               check_memory=not args.no_memory_check, distilled=distilled,
                               stats=stats, mesh=getattr(args, "device_mesh", None),
                               step_weights=getattr(args, "step_weights", "float32"),
                               smooth=getattr(args, "smooth", "auto")):
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


# -- Distilled filters and the exact-vs-modal comparison. --------------------------------------

def choose_strategy(requested: str | None, checkpoint: str | None) -> tuple[str, bool]:
  """(strategy, whether the checkpoint holds distilled filters): `requested`, or by default
  'modal' for a directory with distilled filters and 'flash' otherwise.

  Raises:
    ValueError: 'modal' asked for a checkpoint without distilled filters.
  """
  distilled_here = checkpoint is not None and has_distilled(checkpoint)
  strategy = requested if requested is not None else ("modal" if distilled_here else "flash")
  if strategy == "modal" and not distilled_here:
    where = "the shipped byte-level LM has" if checkpoint is None else f"{checkpoint} holds"
    raise ValueError(f"--strategy modal runs distilled filters, and {where} none; make them "
                     "with lcsm-distill (--order N or --tol T) --out DIR and pass "
                     "--checkpoint DIR.")
  return strategy, distilled_here


def describe_distilled(distilled: Any) -> str:
  """'order N, median relative l2 tap error E' from the filters and their stored report."""
  overall = distilled.report.get("overall", {})
  median = overall.get("rel_l2", {}).get("p50")
  error = f"{median:.3g}" if median is not None else "unknown (no report stored)"
  return f"order {distilled.order}, median relative l2 tap error {error}"


def next_token_kl(exact_logits: np.ndarray, modal_logits: np.ndarray) -> np.ndarray:
  """KL(exact || modal) per row of next-token logits (N, V) (softmax at temperature 1),
  computed in float64: (N,) >= 0."""
  log_p = _log_softmax(np.asarray(exact_logits, np.float64))
  log_q = _log_softmax(np.asarray(modal_logits, np.float64))
  return np.maximum(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
  """The first index where token sequences (N,) differ, or None when they are equal."""
  differ = np.flatnonzero(np.asarray(a) != np.asarray(b))
  return int(differ[0]) if differ.size else None


def sequence_kl(params: Any, config: HyenaConfig, prompt_ids: np.ndarray, tokens: np.ndarray,
                distilled: Any, tau: str | int, check_memory: bool) -> np.ndarray:
  """KL(exact || modal) (N,) of the next-token distributions of the N tokens (N,) after the
  prompt (P,): both models score prompt + tokens[:-1] (`teacher_forced_logits`, exact with
  flash on the original filters, modal on `distilled`); step j compares the distributions
  token j was drawn from (position P - 1 + j), over the real vocabulary."""
  ids = np.concatenate([prompt_ids, tokens[:-1]]).astype(np.int32)[None]
  prompt_length = prompt_ids.size
  vocab = config.vocab_size
  exact = lcsm_jax.teacher_forced_logits(params, config, ids, prompt_length=prompt_length,
                                         strategy=EXACT_REFERENCE, tau=tau,
                                         check_memory=check_memory)
  modal = lcsm_jax.teacher_forced_logits(params, config, ids, prompt_length=prompt_length,
                                         strategy="modal", distilled=distilled,
                                         check_memory=check_memory)
  steps = slice(prompt_length - 1, None)
  return next_token_kl(np.asarray(exact[0, steps, :vocab]), np.asarray(modal[0, steps, :vocab]))


def agreement_line(modal_tokens: np.ndarray, exact_tokens: np.ndarray, kl: np.ndarray) -> str:
  """One greppable line: `compare_exact: equal_tokens=E/N first_difference=I|none
  mean_kl=K max_kl=M ...`."""
  index = first_difference(modal_tokens, exact_tokens)
  equal = modal_tokens.size if index is None else index
  return (f"compare_exact: equal_tokens={equal}/{modal_tokens.size} "
          f"first_difference={'none' if index is None else index} mean_kl={kl.mean():.6g} "
          f"max_kl={kl.max():.6g} (tokens of modal and {EXACT_REFERENCE} with the same seed, "
          "equal until the first difference (0-based); KL(exact || modal) in nats of the "
          "next-token distributions along the modal text, softmax at temperature 1)")


def _compare_exact(args: argparse.Namespace, params: Any, config: HyenaConfig,
                   tokenizer: Tokenizer, prompt_ids: np.ndarray, tokens: np.ndarray,
                   stats: GenerationStats, distilled: Any, err: TextIO) -> None:
  """Runs the exact strategy like the modal run and prints the agreement to `err`."""
  exact_tokens, exact_stats = _generate_and_print(args, params, config, tokenizer, prompt_ids,
                                                  EXACT_REFERENCE, None, err)
  print(exact_stats.summary(), file=err)
  kl = sequence_kl(params, config, prompt_ids, tokens, distilled, args.tau,
                   not args.no_memory_check)
  speedup = exact_stats.run_s / stats.run_s if stats.run_s > 0 else float("inf")
  print(f"modal speed-up over {EXACT_REFERENCE}: {speedup:.2f}x (compile time not counted)",
        file=err)
  print(agreement_line(tokens, exact_tokens, kl), file=err, flush=True)


def _check_comparisons(args: argparse.Namespace, strategy: str, config: HyenaConfig,
                       prompt_ids: np.ndarray) -> None:
  """Raises ValueError for a comparison that does not fit the run (before any text)."""
  exact = strategy_class(strategy).exact
  if args.compare_exact and exact:
    raise ValueError(f"--compare_exact compares the approximate modal strategy with the exact "
                     f"one; the strategy here is {strategy}, exact already (it needs a "
                     "--checkpoint directory with distilled filters, from lcsm-distill).")
  if args.compare_lazy and not exact:
    raise ValueError(f"--compare_lazy checks an exact strategy against lazy (identical text); "
                     f"{strategy} is approximate: use --compare_exact.")
  if args.compare_exact:
    try:
      check_lengths(config, prompt_ids, args.num_tokens, args.chunk_tokens, EXACT_REFERENCE)
    except ValueError as e:
      raise ValueError(f"--compare_exact also runs {EXACT_REFERENCE}, exact, which cannot go "
                       f"past l_max: {e}") from None


def _prefer_sequential_scheduler(smooth: bool | str, err: TextIO) -> None:
  """XLA:CPU's concurrency-optimized scheduler off for this process, unless XLA_FLAGS chooses
  (`tuning.scheduler`): the smoothed schedule needs it off to meet its targets and the plain
  one is no slower. `smooth`: the --smooth flag (True, False or 'auto' when not given); with
  --smooth, says so on `err` when it is too late (JAX already started)."""
  if scheduler.configured() is not None or scheduler.turn_off_concurrency_scheduler():
    return
  if smooth is True:
    print(f"{PROG}: --smooth: JAX has already started, so XLA:CPU keeps its "
          "concurrency-optimized scheduler (slower smoothed runs on several cores)", file=err,
          flush=True)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
  """Loads the model, streams the text to `out`, reports to `err`. Returns the exit code."""
  if args.host_devices is not None:  # before anything starts JAX's backends
    common.set_host_devices(args.host_devices)
  _prefer_sequential_scheduler(args.smooth, err)  # also before JAX starts
  args.device_mesh = None if args.mesh is None else common.make_mesh(args.mesh)
  config, params, description = load_checkpoint(args.checkpoint, args.device_mesh)
  strategy, distilled_here = choose_strategy(args.strategy, args.checkpoint)
  tokenizer = tokenizer_for(config)
  prompt = tokenizer.default_prompt if args.prompt is None else args.prompt
  prompt_ids = tokenizer.encode(prompt)
  check_lengths(config, prompt_ids, args.num_tokens, args.chunk_tokens, strategy)
  _check_comparisons(args, strategy, config, prompt_ids)
  distilled = load_distilled(args.checkpoint) if strategy == "modal" else None
  print(f"{PROG}: {description} (vocabulary {config.vocab_size}, {tokenizer.name}, "
        f"l_max {config.l_max}); strategy {strategy}, seed {args.seed}", file=err,
        flush=True)
  if distilled is not None:
    print(f"{PROG}: strategy modal on the distilled filters of {args.checkpoint} "
          f"({describe_distilled(distilled)}): approximate", file=err, flush=True)
  elif distilled_here:
    print(f"{PROG}: {args.checkpoint} holds distilled filters; strategy {strategy} runs exactly "
          "on the original filters", file=err, flush=True)
  tokens, stats = _generate_and_print(args, params, config, tokenizer, prompt_ids, strategy,
                                      out, err, distilled)
  print(stats.summary(), file=err)
  if args.compare_exact:
    _compare_exact(args, params, config, tokenizer, prompt_ids, tokens, stats, distilled, err)
    return 0
  if not args.compare_lazy:
    return 0
  if strategy == "lazy":
    print("--compare_lazy: the strategy is already lazy; nothing to compare.", file=err)
    return 0
  lazy_tokens, lazy_stats = _generate_and_print(args, params, config, tokenizer, prompt_ids,
                                                "lazy", None, err)
  print(lazy_stats.summary(), file=err)
  identical = np.array_equal(tokens, lazy_tokens)
  speedup = lazy_stats.run_s / stats.run_s if stats.run_s > 0 else float("inf")
  print(f"lazy text identical to {strategy}: {'yes' if identical else 'NO'}; "
        f"{strategy} speed-up over lazy: {speedup:.2f}x (compile time not counted)",
        file=err)
  return 0 if identical else EXIT_MISMATCH


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `lcsm-generate`; `argv` without the program name (default sys.argv[1:]).

  Returns the exit code:
    0: success (--compare_exact reports differences but does not change it: modal is
      approximate).
    1: --compare_lazy found different text.
    2: bad usage or input: one line `lcsm-generate: error: ...` on stderr, no traceback
      (options, the seed's range included, are checked before anything goes to stdout; so is
      the run's memory). Among them: --strategy modal, or --compare_exact, without distilled
      filters; --compare_exact past l_max (the exact run cannot go there); --compare_lazy
      with modal.
    130 (128 + SIGINT): interrupted (Ctrl-C); `lcsm-generate: interrupted` on stderr. Called
      from the main thread, the process ends at once, by os._exit, without returning (see
      `common.ctrl_c_exits_at_once` for why). Nothing printed is lost: stdout is flushed
      after every chunk.
    141 (128 + SIGPIPE): the reader of stdout went away (`lcsm-generate ... | head -c 10`):
      generation stops, nothing is printed on stderr.
  """
  return common.run_main(PROG, build_parser(), run, argv)
