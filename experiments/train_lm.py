"""Trains the byte-level Hyena language model on the Python standard library's source.

  python experiments/train_lm.py --workdir=/tmp/byte_lm

The defaults are the configuration of the model shipped in `lcsm_jax/assets/byte_lm/` (about
20 minutes on 2 CPU cores). The loop lives in `lcsm_jax/training/trainer.py`, the corpus in
`lcsm_jax/training/corpus.py`. Outputs (see `trainer.train_and_evaluate`): `WORKDIR/checkpoint/`
with config.json, params.safetensors, metrics.json, heldout_sample.npy; and `WORKDIR/log.jsonl`.
"""

from absl import app
from absl import flags
from absl import logging

from lcsm_jax import text
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.training import corpus
from lcsm_jax.training import trainer

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.DEFINE_string("cache_dir", None, "Optional directory to cache the corpus arrays in.")
# Model.
flags.DEFINE_integer("d_model", 128, "Width of the residual stream.")
flags.DEFINE_integer("n_layer", 4, "Number of Hyena blocks.")
flags.DEFINE_integer("d_inner", 512, "Hidden width of each block's MLP.")
flags.DEFINE_integer("order", 2, "Hyena order (order - 1 long convolutions per block).")
flags.DEFINE_integer("l_max", 1024, "Longest sequence the model accepts.")
flags.DEFINE_integer("filter_order", 64, "Width of the implicit filter MLP.")
# Training.
flags.DEFINE_integer("seq_len", 256, "Training window length (tokens).")
flags.DEFINE_integer("batch_size", 8, "Windows per step.")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.")
flags.DEFINE_float("filter_learning_rate", 1e-3,
                   "Peak learning rate of the implicit filter's parameters (same schedule).")
flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps before the cosine decay.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clipping.")
flags.DEFINE_integer("eval_interval", 250, "Steps between evaluations and checkpoints.")
flags.DEFINE_integer("log_interval", 10, "Steps between training-loss log lines.")
flags.DEFINE_integer("eval_windows", 256, "Held-out windows in the evaluation set.")
flags.DEFINE_bool("train_pos_emb", False, "Train the filter's positional table z.")
flags.DEFINE_float("heldout_fraction", corpus.DEFAULT_HELDOUT_FRACTION,
                   "Share of stdlib files held out.")
flags.DEFINE_integer("seed", 0, "Seed of the initialization and of the batch sampling.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  data = corpus.build_corpus(heldout_fraction=FLAGS.heldout_fraction, cache_dir=FLAGS.cache_dir)
  logging.info("corpus: %s", data.describe())
  model_config = HyenaConfig(
      vocab_size=text.VOCAB_SIZE, d_model=FLAGS.d_model, n_layer=FLAGS.n_layer,
      d_inner=FLAGS.d_inner, order=FLAGS.order, l_max=FLAGS.l_max,
      filter_order=FLAGS.filter_order, pad_vocab_size_multiple=8)
  train_config = trainer.TrainConfig(
      seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
      learning_rate=FLAGS.learning_rate,
      filter_learning_rate=FLAGS.filter_learning_rate, warmup_steps=FLAGS.warmup_steps,
      weight_decay=FLAGS.weight_decay, grad_clip=FLAGS.grad_clip,
      eval_interval=FLAGS.eval_interval, log_interval=FLAGS.log_interval,
      eval_windows=FLAGS.eval_windows, train_pos_emb=FLAGS.train_pos_emb, seed=FLAGS.seed)
  trainer.train_and_evaluate(model_config, train_config, data.train, data.validation,
                             FLAGS.workdir, extra_metadata={"corpus": data.describe()})


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
