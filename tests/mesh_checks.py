"""Checks of generation on a device mesh, run by `tests/test_sharding.py` in processes of their
own with 8 host CPU devices (the device count is fixed when JAX starts its backends):

  python tests/mesh_checks.py exactness 2,4   # tokens and logits vs one device, every strategy
  python tests/mesh_checks.py rollout         # ConvStack through Rollout, functions, errors
  python tests/mesh_checks.py hlo             # collectives in the compiled programs
  python tests/mesh_checks.py load            # a checkpoint loaded straight into its shards

Each prints what it checked and exits non-zero on the first failure (an AssertionError with the
numbers). Sizes are tiny so that compilation dominates.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import lcsm_jax  # pylint: disable=wrong-import-position
from lcsm_jax.decoding import sharding as sharding_lib  # pylint: disable=wrong-import-position
from lcsm_jax.models.conv_stack import ConvStack  # pylint: disable=wrong-import-position
from lcsm_jax.models.hyena import HyenaConfig, init_params  # pylint: disable=wrong-import-position

rollout_lib = importlib.import_module("lcsm_jax.decoding.rollout")
session_lib = importlib.import_module("lcsm_jax.decoding.session")

CONFIG = HyenaConfig(vocab_size=13, d_model=16, n_layer=2, d_inner=32, l_max=64, order=2,
                     filter_order=8)
STRATEGIES = ("flash", "lazy", "eager", "recompute", "modal")
MAX_LENGTH = 24
NUM_TOKENS = 10
PROMPTS = (3, 12)  # shorter and longer than prompt.DIRECT_PROMPT_MAX = 8
RTOL = 1e-5        # logits, relative to max |logit|
ENGINE = dict(tau=4, check_memory=False)
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")


def mesh_of(shape: tuple[int, int]) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, ("data", "model"))


def lm():
  params = init_params(CONFIG, jax.random.key(0))
  return params, lcsm_jax.distill(params, CONFIG, order=4, warn_error=10.0)


def exactness(shape: tuple[int, int]) -> None:
  """Greedy tokens identical to one device, logits within RTOL, for every strategy, prompts of
  3 and 12 tokens, batch 1 (data axis 1) and 8; the state stays sharded across calls."""
  params, distilled = lm()
  mesh = mesh_of(shape)
  batches = (1, 8) if shape[0] == 1 else (8,)
  for strategy in STRATEGIES:
    extra = dict(distilled=distilled) if strategy == "modal" else {}
    one = lcsm_jax.Decoder(params, CONFIG, strategy, MAX_LENGTH, **ENGINE, **extra)
    many = lcsm_jax.Decoder(params, CONFIG, strategy, MAX_LENGTH, mesh=mesh, **ENGINE, **extra)
    for batch in batches:
      for length in PROMPTS:
        prompt = np.asarray(jax.random.randint(jax.random.key(length), (batch, length), 0,
                                               CONFIG.vocab_size))
        want, _ = one.generate(one.prefill(prompt), NUM_TOKENS, temperature=0,
                               return_logits=True)
        state = many.prefill(prompt)
        first, state = many.generate(state, NUM_TOKENS // 2, temperature=0, return_logits=True)
        second, state = many.generate(state, NUM_TOKENS - NUM_TOKENS // 2, temperature=0,
                                      return_logits=True)
        tokens = np.concatenate([first.tokens, second.tokens], axis=1)
        logits = np.concatenate([first.logits, second.logits], axis=1)
        where = f"{strategy} mesh {shape} batch {batch} prompt {length}"
        assert np.array_equal(tokens, want.tokens), f"{where}: tokens {tokens} vs {want.tokens}"
        error = np.abs(logits - want.logits).max() / np.abs(want.logits).max()
        assert error <= RTOL, f"{where}: logits differ by {error:.2e} relative"
        specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.engine.strategy)
                 if x.ndim >= 2 and x.size]
        axes = [name for name, size in zip(("data", "model"), shape) if size > 1
                and (strategy != "recompute" or name == "data")]  # recompute keeps token ids
        assert (specs or not axes) and all(name in spec for spec in specs for name in axes), \
            f"{where}: state shardings {specs}"
        print(f"ok {where}: tokens equal, logits {error:.1e}", flush=True)


def rollout() -> None:
  """ConvStack through Rollout on (2, 4) equals one device for every strategy; generate and
  teacher_forced_logits take mesh=; indivisible batch / width and bad axes are refused."""
  model = ConvStack(2, 16, 64)
  params = model.init(jax.random.key(0))
  mesh = mesh_of((2, 4))
  distilled = lcsm_jax.distill(params, model, order=4, warn_error=10.0)
  for length in PROMPTS:
    prompt = jax.random.normal(jax.random.key(length), (8, length, 16))
    for strategy in STRATEGIES:
      extra = dict(distilled=distilled) if strategy == "modal" else {}
      want = rollout_lib.rollout(params, model, prompt, 9, strategy=strategy, **ENGINE, **extra)
      got = rollout_lib.rollout(params, model, prompt, 9, strategy=strategy, mesh=mesh, **ENGINE,
                                **extra)
      error = float(jnp.abs(got - want).max())
      assert error <= 1e-5, f"rollout {strategy} prompt {length}: differs by {error:.2e}"
      print(f"ok rollout {strategy} prompt {length}: {error:.1e}", flush=True)

  # flash's smoothed schedule: chunks of the local channels spread over the steps
  smooth_model = ConvStack(2, 16, 160)
  smooth_params = smooth_model.init(jax.random.key(1))
  prompt = jax.random.normal(jax.random.key(2), (8, 3, 16))
  options = dict(ENGINE, tau=1, smooth=1)  # bridge level 4; levels 16 and 64 spread
  want = rollout_lib.rollout(smooth_params, smooth_model, prompt, 157, **options)
  got = rollout_lib.rollout(smooth_params, smooth_model, prompt, 157, mesh=mesh, **options)
  error = float(jnp.abs(got - want).max())
  assert error <= 1e-5, f"rollout flash smooth=1: differs by {error:.2e}"
  print(f"ok rollout flash smooth=1: {error:.1e}", flush=True)

  lm_params, _ = lm()
  ids = np.asarray(jax.random.randint(jax.random.key(5), (4, 14), 0, CONFIG.vocab_size))
  want = lcsm_jax.teacher_forced_logits(lm_params, CONFIG, ids, prompt_length=5, **ENGINE)
  got = lcsm_jax.teacher_forced_logits(lm_params, CONFIG, ids, prompt_length=5, **ENGINE,
                                       mesh=mesh_of((2, 4)))
  error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert error <= RTOL, f"teacher_forced_logits on a mesh: {error:.2e}"
  key = jax.random.key(3)
  want = lcsm_jax.generate(lm_params, CONFIG, ids[:, :6], 8, key, **ENGINE)
  got = lcsm_jax.generate(lm_params, CONFIG, ids[:, :6], 8, key, mesh=mesh_of((4, 2)),
                          mesh_axes=("data", "model"), **ENGINE)
  assert np.array_equal(got.tokens, want.tokens), "sampled tokens differ on a (4, 2) mesh"
  print("ok generate and teacher_forced_logits with mesh=", flush=True)

  def refused(fn, pattern):
    try:
      fn()
    except ValueError as e:
      assert re.search(pattern, str(e)), f"message {e!r} lacks {pattern!r}"
      print(f"ok refused: {e}", flush=True)
      return
    raise AssertionError(f"not refused: {pattern}")

  refused(lambda: lcsm_jax.generate(lm_params, CONFIG, ids[:3, :4], 2, key, mesh=mesh, **ENGINE),
          r"batch size 3 is not divisible by the mesh's data axis 'data' of size 2")
  refused(lambda: lcsm_jax.Decoder(lm_params, CONFIG, mesh=jax.make_mesh((1, 8), ("d", "m"))),
          r"data axis 'data' is not an axis of the mesh \('d', 'm'\)")
  wide = jax.sharding.Mesh(np.asarray(jax.devices()[:3]).reshape(1, 3), ("data", "model"))
  refused(lambda: lcsm_jax.Decoder(lm_params, CONFIG, mesh=wide),
          r"width \(channels\) 16 is not divisible by the mesh's model axis 'model' of size 3")
  renamed = jax.make_mesh((2, 4), ("rows", "channels"))
  got = lcsm_jax.generate(lm_params, CONFIG, ids[:, :6], 8, key, mesh=renamed,
                          mesh_axes=("rows", "channels"), **ENGINE)
  assert np.array_equal(got.tokens, want.tokens), "tokens differ with renamed mesh axes"
  print("ok mesh_axes=('rows', 'channels')", flush=True)


def collectives(text: str) -> collections.Counter:
  """Collective operations in compiled HLO text, by kind and result shape."""
  found = collections.Counter()
  for kind, shape in re.findall(
      r"= (\w+\[[\d,]*\])\S* (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", text):
    found[(shape, kind)] += 1
  return found


def hlo() -> None:
  """No collective in the mixing: for the ConvStack (per-channel model, no projections) none in
  the tables, prefill (its FFT convolutions run on each device's shards) and token-loop
  programs of every strategy but recompute; for the language model
  every collective is on a per-token array (B, features), never on a state or table."""
  mesh = mesh_of((2, 4))
  model = ConvStack(2, 16, 64)
  params = model.init(jax.random.key(0))
  distilled = lcsm_jax.distill(params, model, order=4, warn_error=10.0)
  for strategy in STRATEGIES:
    extra = dict(distilled=distilled) if strategy == "modal" else {}
    session = rollout_lib.Rollout(params, model, strategy, MAX_LENGTH, mesh=mesh, **ENGINE,
                                  **extra)
    engine = session.engine(8)
    tables = session.compiled(session_lib.prepare_program, dict(engine=session._table_engine),  # pylint: disable=protected-access
                              session._full_params, session.aux)  # pylint: disable=protected-access
    counts = {}
    for length in PROMPTS:
      prompt = sharding_lib.place(session.sharding, jnp.ones((8, length, 16)), sharding_lib.ROWS)
      prefill = session.compiled(rollout_lib._PREFILL, dict(engine=engine), session.params,  # pylint: disable=protected-access
                                 session.tables, prompt)
      counts[length] = sum(collectives(prefill.as_text()).values())
      _, state = session.prefill(prompt)
      run = session.compiled(session._run_program, dict(engine=engine, num_steps=5),  # pylint: disable=protected-access
                             session.params, session.tables, state)
      found = collectives(run.as_text())
      kernel = importlib.import_module("cpu_kernels.modal_step")
      if strategy == "modal" and kernel.available():  # the per-shard update's custom call
        assert kernel.TARGET in run.as_text(), "modal: its CPU kernel is not used on the mesh"
      if strategy != "recompute":  # recompute runs the parallel forward: XLA's collectives
        assert not found, f"{strategy} prompt {length}: token loop has collectives {found}"
    table_found = collectives(tables.as_text())
    assert not table_found, f"{strategy}: table program has collectives {table_found}"
    assert counts[12] == counts[3] == 0, f"{strategy}: prefill collectives {counts}"
    print(f"ok hlo ConvStack {strategy}: tables 0, token loop "
          f"{'0' if strategy != 'recompute' else 'XLA'}, prefill 0 (its long convolutions on "
          "each device's shards) for both prompts", flush=True)

  params, _ = lm()
  decoder = lcsm_jax.Decoder(params, CONFIG, "flash", MAX_LENGTH, mesh=mesh, **ENGINE)
  state = decoder.prefill(np.zeros((8, 12), np.int32))
  decoder_lib = importlib.import_module("lcsm_jax.decoding.decoder")
  prompt = sharding_lib.place(decoder.sharding, np.zeros((8, 12), np.int32), sharding_lib.ROWS)
  prefill = decoder.compiled(decoder_lib._PROGRAMS["prefill"], decoder._prefill_static(8, False),  # pylint: disable=protected-access
                             decoder.params, decoder.tables, prompt)
  found = collectives(prefill.as_text())
  print("LM flash prefill on (2, 4), prompt 12:",
        {f"{kind} {shape}": n for (shape, kind), n in sorted(found.items())}, flush=True)
  n = lcsm_jax.convolution.fft_length(2 * 12)
  shapes = {key: next(part for part in key if "[" in part) for key in found}  # 'f32[4,12,16]'
  spectral = {key: count for key, count in found.items()
              if shapes[key].startswith("c") or str(n) in shapes[key][4:-1].split(",")}
  assert not spectral, f"collectives on the LM prefill's FFT operands or spectra: {spectral}"
  sampling = importlib.import_module("lcsm_jax.decoding.sampling")
  sampler = decoder.put(decoder_lib._Sampler(None, None, jnp.float32(1), jnp.float32(1), None))  # pylint: disable=protected-access
  static = dict(engine=decoder.engine(8),
                config=sampling.SamplingConfig(CONFIG.vocab_size, True, None, False),
                num_tokens=4, return_logits=False, on_token=None)
  compiled = decoder.compiled(decoder_lib._PROGRAMS["generate"], static, decoder.params,  # pylint: disable=protected-access
                              decoder.tables, state, sampler)
  found = collectives(compiled.as_text())
  print("LM flash generate on (2, 4), d_model 16, 2 layers, batch 8:",
        {f"{kind} {shape}": n for (shape, kind), n in sorted(found.items())}, flush=True)
  assert found, "the LM's projections need collectives: none found (is the mesh used?)"
  # the states and tables are (positions, streams, batch, channels) or (streams, channels, F):
  # rank >= 3 (the short-convolution carry, rank 4, is gathered once per call at most)
  big = {(shape, kind): n for (shape, kind), n in found.items()
         if len(shape.split(",")) >= 3 and n > 1}
  assert not big, f"collectives on state-sized arrays in the LM's generation: {big}"


def load() -> None:
  """`io.load_params(path, mesh)` builds every array on the mesh by the model's param_partition,
  each device reading only its slice (every get_slice read recorded); the arrays equal the plain
  load; Decoder(mesh=) keeps them where they are (same arrays, no copy) and generates one
  device's tokens; a non-finite slice is refused by name."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  from lcsm_jax import io  # pylint: disable=import-outside-toplevel
  from lcsm_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  params, _ = lm()
  mesh = mesh_of((2, 4))
  with tempfile.TemporaryDirectory() as tmp:
    io.save_params(tmp, CONFIG, params)
    _, plain = io.load_params(tmp)
    reads = collections.defaultdict(list)  # name -> shapes of the slices read
    original = safetensors.safe_open

    class Recording:
      """safe_open whose get_slice records the shape of every slice read."""

      def __init__(self, *args, **kwargs):
        self.inner = original(*args, **kwargs)

      def __enter__(self):
        self.file = self.inner.__enter__()
        return self

      def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

      def __getattr__(self, name):
        return getattr(self.file, name)

      def get_slice(self, name):
        piece = self.file.get_slice(name)

        class Slice:
          def __getitem__(self, index):
            block = piece[index]
            reads[name].append(block.shape)
            return block

          def __getattr__(self, attr):
            return getattr(piece, attr)

        return Slice()

    safetensors.safe_open = Recording
    try:
      config, sharded = io.load_params(tmp, mesh)
    finally:
      safetensors.safe_open = original
    want = dict(jax.tree_util.tree_leaves_with_path(plain))
    split = 0
    for path, x in jax.tree_util.tree_leaves_with_path(sharded):
      name = "/".join(k.key for k in path)
      assert isinstance(x, jax.Array) and np.array_equal(np.asarray(x), want[path]), name
      spec = tuple(x.sharding.spec)
      shard = x.sharding.shard_shape(x.shape)
      assert reads[name] and all(tuple(s) == shard for s in reads[name]), \
          f"{name}: read {reads[name]}, shard {shard}"
      assert len(reads[name]) <= len(jax.devices()), f"{name}: {len(reads[name])} reads"
      for s in x.addressable_shards:
        assert np.array_equal(np.asarray(s.data), np.asarray(want[path])[s.index]), name
      if "model" in spec:
        split += 1
        assert shard != x.shape, f"{name}: spec {spec}, shard {shard}"
    total = sum(np.prod(s) for shapes in reads.values() for s in shapes)
    largest = sum(np.prod(x.shape) for x in jax.tree.leaves(plain))
    print(f"ok load: {split} parameters split over 'model', each device read its slice "
          f"({total} elements read in all by 8 devices, model {largest})", flush=True)

    decoder = lcsm_jax.Decoder(sharded, config, "flash", MAX_LENGTH, mesh=mesh, **ENGINE)
    same = all(a is b or all(p.data.unsafe_buffer_pointer() == q.data.unsafe_buffer_pointer()
                             for p, q in zip(a.addressable_shards, b.addressable_shards))
               for a, b in zip(jax.tree.leaves(decoder.params), jax.tree.leaves(sharded)))
    assert same, "Decoder(mesh=) copied parameters that were already on the mesh"
    one = lcsm_jax.Decoder(plain, CONFIG, "flash", MAX_LENGTH, **ENGINE)
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (8, 5), 0, CONFIG.vocab_size))
    got, _ = decoder.generate(decoder.prefill(prompt), 6, temperature=0)
    ref, _ = one.generate(one.prefill(prompt), 6, temperature=0)
    assert np.array_equal(got.tokens, ref.tokens), "tokens differ after a sharded load"
    print("ok Decoder(mesh=) keeps the loaded shards in place; tokens equal", flush=True)

    config_again, via_detect, _ = io.load_checkpoint(tmp, mesh)
    assert config_again == config and all(
        x.sharding == y.sharding for x, y in zip(jax.tree.leaves(via_detect),
                                                 jax.tree.leaves(sharded)))
    bad = jax.tree.map(np.array, plain)
    bad["params"]["ln_f"]["bias"][-1] = np.nan  # in the last model shard only
    io.save_params(tmp + "/ok", CONFIG, plain)
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    weights = tmp + "/ok/params.safetensors"
    with original(weights, framework="np") as f:
      metadata = f.metadata()
    save_file({k: np.asarray(v) for k, v in traverse_util.flatten_dict(bad, sep="/").items()},
              weights, metadata=metadata)
    try:
      io.load_params(tmp + "/ok", mesh)
    except CheckpointError as e:
      assert "params/ln_f/bias" in str(e), e
      print(f"ok refused: {e}", flush=True)
    else:
      raise AssertionError("a NaN in one shard was not refused")


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  check = sys.argv[1]
  if check == "exactness":
    exactness(tuple(int(n) for n in sys.argv[2].split(",")))
  elif check == "rollout":
    rollout()
  elif check == "hlo":
    hlo()
  elif check == "load":
    load()
  else:
    raise SystemExit(f"unknown check {check!r}")
  print("all ok")
