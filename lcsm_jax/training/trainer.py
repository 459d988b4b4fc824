"""Training a byte-level Hyena language model: state, loss, optimizer, evaluation, loop.

The loop is deliberately plain: sample random windows from the training bytes, take one jitted
AdamW step, and every `eval_interval` steps measure the held-out loss on a fixed, deterministic
set of windows, write a checkpoint (`native.save_params`) and append to a JSON-lines log.

Frozen parameters: the filter's time grid `t` and positional table `z` are stored parameters in
HyenaDNA but are never trained there (`lr_pos_emb = 0`). Both are frozen here too (their
gradient and update are set to zero); `TrainConfig.train_pos_emb = True` unfreezes `z`.
`t` is always frozen: it is the time axis of the decay window, not a learned feature.

Optimizer: global-norm clipping, then AdamW with a linear-warmup + cosine schedule; the implicit
filter's parameters get their own (lower) peak rate and no weight decay, as in Hyena.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from lcsm_jax.io import native
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one training run (the model's architecture is a `HyenaConfig`).

  The defaults are those of the shipped byte-level model. `filter_learning_rate` is the peak
  learning rate of the implicit filter (its MLP's `Sin(10 x)` makes it far more sensitive than
  the projections: at the main rate, training showed repeated loss spikes); None means
  `learning_rate`. `sample_windows`: the first eval windows, whose loss is recorded apart
  so that a test can recompute it cheaply.
  """

  seq_len: int = 256
  batch_size: int = 8
  steps: int = 2000
  learning_rate: float = 3e-3
  filter_learning_rate: float | None = 1e-3
  end_learning_rate_fraction: float = 0.1
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b2: float = 0.98
  grad_clip: float = 1.0
  eval_interval: int = 250
  log_interval: int = 10
  eval_windows: int = 256
  eval_batch_size: int = 16
  sample_windows: int = 4
  train_pos_emb: bool = False
  seed: int = 0

  def __post_init__(self):
    for name in ("seq_len", "batch_size", "steps", "eval_interval", "log_interval",
                 "eval_windows", "eval_batch_size", "sample_windows"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.sample_windows > self.eval_windows:
      raise ValueError("sample_windows must not exceed eval_windows.")


# -- Parameters: which are trained, which are decayed. ------------------------------------------

def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params: Params, train_pos_emb: bool = False) -> Params:
  """A tree of booleans: False for the filter's `t` (always) and `z` (unless `train_pos_emb`)."""
  frozen = {"t"} if train_pos_emb else {"t", "z"}

  def trainable(path, _):
    names = _path_names(path)
    return not ("filter" in names and names[-1] in frozen)

  return jax.tree_util.tree_map_with_path(trainable, params)


def decay_mask(params: Params) -> Params:
  """Weight decay applies to matrices (projections, MLP, embedding, short-conv kernels) only:
  not to biases, LayerNorms, or anything in the implicit filter (HyenaDNA's choice)."""

  def decayed(path, leaf):
    names = _path_names(path)
    return "filter" not in names and names[-1] in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(decayed, params)


def count_params(params: Params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def learning_rate_schedule(cfg: TrainConfig, peak: float | None = None) -> optax.Schedule:
  """Linear warmup to `peak` (default `learning_rate`), cosine decay to
  `end_learning_rate_fraction` of it at `steps`."""
  peak = cfg.learning_rate if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=peak * cfg.end_learning_rate_fraction)


def param_groups(params: Params, train_pos_emb: bool = False) -> Params:
  """'frozen' (`t`, and `z` unless `train_pos_emb`), 'filter' (the rest of the implicit filter)
  or 'main' for every parameter."""
  trainable = trainable_mask(params, train_pos_emb)

  def group(path, is_trainable):
    if not is_trainable:
      return "frozen"
    return "filter" if "filter" in _path_names(path) else "main"

  return jax.tree_util.tree_map_with_path(group, trainable)


def make_optimizer(cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
  """Frozen gradients zeroed -> global-norm clipping -> AdamW, with its own peak learning rate
  for the implicit filter (`filter_learning_rate`; Hyena also gives the filter its own rate)
  and weight decay on matrices only -> frozen updates zeroed."""
  groups = param_groups(params, cfg.train_pos_emb)
  frozen = jax.tree.map(lambda g: g == "frozen", groups)
  adamw = functools.partial(optax.adamw, b1=0.9, b2=cfg.b2, weight_decay=cfg.weight_decay,
                            mask=decay_mask)
  filter_lr = cfg.learning_rate if cfg.filter_learning_rate is None else cfg.filter_learning_rate
  return optax.chain(
      optax.masked(optax.set_to_zero(), frozen),
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.multi_transform(
          {"main": adamw(learning_rate_schedule(cfg)),
           "filter": adamw(learning_rate_schedule(cfg, filter_lr)),
           "frozen": optax.set_to_zero()},
          groups),
  )


# -- Loss. --------------------------------------------------------------------------------------

def token_nll(logits: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
  """Next-token negative log-likelihood in nats, (B, L), over the REAL vocabulary only (the
  padded embedding rows are dropped before the softmax)."""
  logits = logits[..., :vocab_size].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def window_nll(model: HyenaLM, params: Params, windows: jax.Array) -> jax.Array:
  """Per-token loss of windows (B, L + 1): inputs `windows[:, :-1]`, targets `windows[:, 1:]`."""
  logits = model.apply({"params": params}, windows[:, :-1])
  return token_nll(logits, windows[:, 1:], model.config.vocab_size)


class TrainState(train_state.TrainState):
  pass


def create_train_state(model_config: HyenaConfig, cfg: TrainConfig,
                       rng: jax.Array) -> tuple[HyenaLM, TrainState]:
  model = HyenaLM(model_config)
  if cfg.seq_len > model_config.l_max:
    raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's l_max {model_config.l_max}.")
  variables = jax.jit(model.init)(rng, jnp.zeros((1, cfg.seq_len), jnp.int32))
  params = variables["params"]
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=make_optimizer(cfg, params))
  return model, state


def make_train_step(model: HyenaLM) -> Callable[[TrainState, jax.Array],
                                                tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `(state, windows (B, L + 1) int32) -> (state, {'loss', 'grad_norm'})`."""

  def loss_fn(params, windows):
    return jnp.mean(window_nll(model, params, windows))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: TrainState, windows: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, windows)
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_fn(model: HyenaLM) -> Callable[[Params, jax.Array], jax.Array]:
  """A jitted `(params, windows) -> summed per-token nll` (float32 scalar)."""
  return jax.jit(lambda params, windows: jnp.sum(window_nll(model, params, windows)))


def evaluate(eval_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
             windows: np.ndarray, batch_size: int) -> float:
  """Mean per-token nll (nats) over all target positions of `windows` (N, L + 1)."""
  total, count = 0.0, 0
  for start in range(0, len(windows), batch_size):
    chunk = windows[start:start + batch_size]
    total += float(eval_fn(params, jnp.asarray(chunk, jnp.int32)))
    count += chunk.shape[0] * (chunk.shape[1] - 1)
  return total / count


# -- Data. --------------------------------------------------------------------------------------

def eval_windows(data: np.ndarray, seq_len: int, num_windows: int) -> np.ndarray:
  """`num_windows` windows of `seq_len + 1` tokens at evenly spaced offsets of `data`
  (deterministic; non-overlapping when `data` is long enough), int32 (N, seq_len + 1)."""
  span = seq_len + 1
  if data.size < span:
    raise ValueError(f"{data.size} held-out tokens are fewer than one window of {span}.")
  offsets = np.linspace(0, data.size - span, num_windows).round().astype(np.int64)
  return data[offsets[:, None] + np.arange(span)].astype(np.int32)


def sample_windows(rng: np.random.Generator, data: np.ndarray, batch_size: int,
                   seq_len: int) -> np.ndarray:
  """A batch of windows (B, seq_len + 1) at uniformly random offsets of `data`, int32."""
  span = seq_len + 1
  offsets = rng.integers(0, data.size - span + 1, size=batch_size)
  return data[offsets[:, None] + np.arange(span)].astype(np.int32)


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """Add-one-smoothed unigram log-probabilities (vocab_size,) from training token counts:
  `log((count + 1) / (total + vocab_size))`, float64."""
  counts = np.bincount(np.asarray(train_tokens).reshape(-1), minlength=vocab_size)
  if counts.size > vocab_size:
    raise ValueError(f"tokens exceed the vocabulary size {vocab_size}.")
  return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_nll(log_probs: np.ndarray, windows: np.ndarray) -> float:
  """Mean nll (nats) of the unigram model on the same targets as `evaluate`: `windows[:, 1:]`."""
  return float(-np.mean(log_probs[windows[:, 1:]]))


def perplexity(nll: float) -> float:
  return float(math.exp(nll))


# -- The loop. ----------------------------------------------------------------------------------

def _checkpoint_metadata(values: Mapping[str, Any]) -> dict[str, str]:
  return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def train_and_evaluate(model_config: HyenaConfig, cfg: TrainConfig, train_tokens: np.ndarray,
                       heldout_tokens: np.ndarray, workdir: str | os.PathLike[str],
                       extra_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Trains from scratch and writes into `workdir`:

    checkpoint/   config.json, params.safetensors (metadata: step, losses, ...), metrics.json,
                  heldout_sample.npy (the first `sample_windows` eval windows, uint8)
    log.jsonl     one JSON object per logged train step and per evaluation

  Returns the final metrics (also `checkpoint/metrics.json`).
  """
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / "checkpoint"
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / "log.jsonl"
  log_path.write_text("")
  start_time = time.time()

  model, state = create_train_state(model_config, cfg, jax.random.key(cfg.seed))
  n_params = count_params(state.params)
  n_trainable = int(sum(np.prod(np.shape(x)) for x, t in zip(
      jax.tree.leaves(state.params),
      jax.tree.leaves(trainable_mask(state.params, cfg.train_pos_emb))) if t))
  logging.info("model: %s", model_config)
  logging.info("parameters: %d (%d trained), %.2f MB float32", n_params, n_trainable,
               4 * n_params / 1e6)
  train_step = make_train_step(model)
  eval_fn = make_eval_fn(model)

  vocab = model_config.vocab_size
  windows = eval_windows(heldout_tokens, cfg.seq_len, cfg.eval_windows)
  sample = windows[:cfg.sample_windows]
  log_probs = unigram_log_probs(train_tokens, vocab)
  unigram = unigram_nll(log_probs, windows)
  unigram_sample = unigram_nll(log_probs, sample)
  logging.info("held-out: %d windows x %d targets; unigram loss %.4f ppl %.3f",
               len(windows), cfg.seq_len, unigram, perplexity(unigram))
  np.save(ckpt_dir / "heldout_sample.npy", sample.astype(np.uint8))

  metrics: dict[str, Any] = {
      "python_version": platform.python_version(),
      "command": " ".join(sys.argv),
      "num_params": n_params,
      "num_trained_params": n_trainable,
      "model_config": model_config.to_hyenadna_dict(),
      "train_config": dataclasses.asdict(cfg),
      "train_tokens": int(train_tokens.size),
      "heldout_tokens": int(heldout_tokens.size),
      "heldout_eval_windows": int(len(windows)),
      "heldout_eval_tokens": int(windows[:, 1:].size),
      "unigram_loss": unigram,
      "unigram_ppl": perplexity(unigram),
      "heldout_sample_windows": int(len(sample)),
      "heldout_sample_unigram_ppl": perplexity(unigram_sample),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      **dict(extra_metadata or {}),
  }

  def log(record):
    with log_path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def save(step, train_loss):
    heldout = evaluate(eval_fn, state.params, windows, cfg.eval_batch_size)
    heldout_sample = evaluate(eval_fn, state.params, sample, cfg.eval_batch_size)
    wall = time.time() - start_time
    metrics.update({
        "step": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_loss": train_loss,
        "train_ppl": perplexity(train_loss),
        "heldout_loss": heldout,
        "heldout_ppl": perplexity(heldout),
        "heldout_sample_loss": heldout_sample,
        "heldout_sample_ppl": perplexity(heldout_sample),
        "wall_time_s": wall,
    })
    logging.info("eval step %d: held-out loss %.4f ppl %.3f (unigram ppl %.3f); wall %.0fs",
                 step, heldout, perplexity(heldout), perplexity(unigram), wall)
    log({"kind": "eval", "step": step, "heldout_loss": heldout,
         "heldout_ppl": perplexity(heldout), "heldout_sample_loss": heldout_sample,
         "wall_time_s": wall})
    native.save_params(ckpt_dir, model_config, {"params": state.params},
                       metadata=_checkpoint_metadata({
                           k: metrics[k] for k in (
                               "step", "heldout_loss", "heldout_ppl", "unigram_ppl",
                               "python_version", "model_config", "train_config")}))
    (ckpt_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

  rng = np.random.default_rng(cfg.seed)
  schedule = learning_rate_schedule(cfg)
  recent: list[float] = []
  step_times: list[float] = []
  train_loss = float("nan")
  last, last_step = time.time(), 1
  for step in range(1, cfg.steps + 1):
    batch = sample_windows(rng, train_tokens, cfg.batch_size, cfg.seq_len)
    state, out = train_step(state, jnp.asarray(batch))
    if step % cfg.log_interval == 0 or step == cfg.steps or step == 1:
      loss = float(out["loss"])  # blocks: the timing below covers the computed steps
      now = time.time()
      if step > last_step:  # step 1 (compilation included) is not timed
        step_times.append((now - last) / (step - last_step))
      last, last_step = now, step
      recent = (recent + [loss])[-10:]
      train_loss = float(np.mean(recent))
      log({"kind": "train", "step": step, "loss": loss, "ppl": perplexity(loss),
           "grad_norm": float(out["grad_norm"]), "lr": float(schedule(step - 1)),
           "step_time_s": step_times[-1] if step_times else None,
           "wall_time_s": now - start_time})
      logging.info("step %d/%d: loss %.4f ppl %.3f grad_norm %.3f lr %.2e (%.3fs/step)",
                   step, cfg.steps, loss, perplexity(loss), float(out["grad_norm"]),
                   float(schedule(step - 1)), step_times[-1] if step_times else float("nan"))
    if step % cfg.eval_interval == 0 or step == cfg.steps:
      metrics["step_time_s"] = float(np.median(step_times)) if step_times else None
      save(step, train_loss)
      last, last_step = time.time(), step  # evaluation time is not step time
  logging.info("done: %s", json.dumps({k: metrics[k] for k in (
      "step", "train_ppl", "heldout_ppl", "unigram_ppl", "wall_time_s")}))
  return metrics
