"""bfloat16 step weights (`step_weights='bfloat16'`): the step reads the dense kernels (in_proj,
out_proj, fc1, fc2) as bfloat16 with float32 activations and accumulation, and every strategy
runs exactly the model whose dense kernels are rounded to bfloat16.

The reference is independent of the adapter's rounding code: the parallel forward
`HyenaLM(config).apply` with a parameter tree whose Dense kernels under `stack/blocks` are
rounded here, by path. float32 stays the default and is unchanged; bad values are refused."""

import importlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import decoding
from lcsm_jax import validation
from lcsm_jax.models import online_model
from lcsm_jax.models.hyena import HyenaConfig, HyenaLM, init_params
from lcsm_jax.models.hyena.online import HyenaOnline

CONFIG = HyenaConfig(vocab_size=13, d_model=16, n_layer=2, d_inner=32, l_max=40, order=2,
                     filter_order=8, emb_dim=3)
ENGINE = dict(tau=2, chunk=8)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 24)).astype(np.int32)


def _rounded(params):
  """The reference model: every `.../{in_proj,out_proj,fc1,fc2}/kernel` under stack/blocks
  rounded to bfloat16 and back to float32, found by path."""
  dense = {"in_proj", "out_proj", "fc1", "fc2"}

  def round_leaf(path, x):
    keys = [getattr(k, "key", str(k)) for k in path]
    if "blocks" in keys and keys[-1] == "kernel" and keys[-2] in dense:
      return x.astype(jnp.bfloat16).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(round_leaf, params)


def _forward(params, tokens):
  return np.asarray(HyenaLM(CONFIG).apply(params, tokens))


def test_default_is_float32_and_unchanged(params, tokens):
  """No option, 'float32' and jnp.float32 are one adapter; step-by-step logits equal the
  float32 forward as before."""
  assert HyenaOnline(CONFIG).step_weights == "float32"
  assert online_model(CONFIG) == online_model(CONFIG, step_weights=jnp.float32)
  default = np.asarray(lcsm_jax.teacher_forced_logits(params, CONFIG, tokens, prompt_length=3,
                                                      **ENGINE))
  explicit = np.asarray(lcsm_jax.teacher_forced_logits(
      params, CONFIG, tokens, prompt_length=3, step_weights="float32", **ENGINE))
  np.testing.assert_array_equal(default, explicit)
  np.testing.assert_allclose(default, _forward(params, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["flash", "lazy"])
@pytest.mark.parametrize("prompt_length", [0, 5])
def test_bfloat16_equals_rounded_model(params, tokens, strategy, prompt_length):
  """Step-by-step logits with bfloat16 step weights equal the forward of the rounded model to
  float32 rounding, and differ from the float32 model by a bfloat16-sized amount (the option
  is really used)."""
  got = np.asarray(lcsm_jax.teacher_forced_logits(
      params, CONFIG, tokens, prompt_length=prompt_length, strategy=strategy,
      step_weights="bfloat16", **ENGINE))
  reference = _forward(_rounded(params), tokens)
  exact = _forward(params, tokens)
  chex.assert_shape(got, reference.shape)
  chex.assert_trees_all_close(got, reference, rtol=1e-5, atol=1e-5)
  scale = float(np.max(np.abs(exact)))
  off = float(np.max(np.abs(got - exact)))
  # each dense kernel rounded by at most eps/2 relative; a few layers compound it
  assert 0 < off < 8 * BF16_EPS * scale, (off, scale)
  assert off > 100 * float(np.max(np.abs(got - reference)))


def test_generate_with_bfloat16_samples_the_rounded_model(params, tokens):
  """Greedy generation with bfloat16 step weights returns logits of the rounded model."""
  out = lcsm_jax.generate(params, CONFIG, tokens[:, :4], 6, temperature=0.0,
                          return_logits=True, step_weights=jnp.bfloat16, **ENGINE)
  ids = np.concatenate([tokens[:, :4], np.asarray(out.tokens)[:, :-1]], axis=1)
  reference = _forward(_rounded(params), ids)[:, 3:, :CONFIG.vocab_size]
  np.testing.assert_allclose(np.asarray(out.logits), reference, rtol=1e-5, atol=1e-5)


def test_constants_hold_bfloat16_kernels(params):
  """The weights are cast once, outside the token loop: the step constants store them as
  bfloat16, everything else float32."""
  model = HyenaOnline(CONFIG, step_weights="bfloat16")
  _, diagonal = model.filters(params, 8)
  constants = model.constants(params, diagonal)
  assert constants.diagonal.dtype == jnp.float32
  for layer in constants.layers:
    for module, dense in (("mixer", "in_proj"), ("mixer", "out_proj"), ("mlp", "fc1"),
                          ("mlp", "fc2")):
      assert layer[module][dense]["kernel"].dtype == jnp.bfloat16
      assert layer[module][dense]["bias"].dtype == jnp.float32
    assert layer["norm1"]["scale"].dtype == jnp.float32
    assert layer["mixer"]["short_conv"]["kernel"].dtype == jnp.float32


def test_decoders_of_either_dtype_do_not_share_states(params, tokens):
  f32 = decoding.Decoder(params, CONFIG, max_length=30, **ENGINE)
  bf16 = decoding.Decoder(params, CONFIG, max_length=30, step_weights="bfloat16", **ENGINE)
  state = f32.prefill(tokens[:, :4])
  with pytest.raises(ValueError):
    bf16.score(state, tokens[:, 4:6])


@pytest.mark.parametrize("bad", ["float16", jnp.float64, "int8", np.int32])
def test_bad_dtype_is_a_value_error(params, bad):
  with pytest.raises(ValueError, match="step_weights must be 'float32' or 'bfloat16'"):
    decoding.Decoder(params, CONFIG, step_weights=bad)


@pytest.mark.parametrize("bad", ["bf16x", None, 3.5])
def test_non_dtype_is_a_type_error(bad):
  with pytest.raises(TypeError, match="step_weights must be"):
    validation.check_step_weights(bad)


def test_unknown_adapter_option_is_named():
  with pytest.raises(TypeError, match="no option colour"):
    online_model(CONFIG, colour="red")


def test_cli_step_weights(capsys, fixture_dir):
  """`lcsm-generate --step_weights bfloat16` prints the text of `lcsm_jax.generate` with
  bfloat16 step weights and the same seed; other values are refused by argparse."""
  from lcsm_jax.cli import generate as cli
  argv = ["--checkpoint", str(fixture_dir), "--prompt", "acgtnA", "--num_tokens", "10",
          "--seed", "3", "--temperature", "1.5", "--top_k", "6"]
  code = cli.main(argv + ["--step_weights", "bfloat16"])
  out = capsys.readouterr().out
  assert code == 0
  config, params = lcsm_jax.load_hyenadna(fixture_dir)
  prompt = np.array([[7, 8, 9, 10, 11, 7]])  # ACGTNA, HyenaDNA's character ids
  expected = np.asarray(lcsm_jax.generate(params, config, prompt, 10, jax.random.key(3),
                                          temperature=1.5, top_k=6,
                                          step_weights="bfloat16").tokens[0])
  names = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]", "A", "C", "G",
           "T", "N"]
  assert out == "ACGTNA" + "".join(names[i] for i in expected) + "\n"
  assert cli.main(argv + ["--step_weights", "float16"]) == 2
  assert "invalid choice: 'float16'" in capsys.readouterr().err


def _called(hlo: str, root: str) -> str:
  """The text of computation `root` and of every computation it calls, transitively."""
  bodies, name, lines = {}, None, []
  for line in hlo.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      lines = []
    elif line.startswith("}") and name is not None:
      bodies[name.lstrip("%")] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  seen, todo = set(), [root]
  while todo:
    current = todo.pop()
    if current in seen or current not in bodies:
      continue
    seen.add(current)
    todo += re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", bodies[current])
  return "\n".join(bodies[c] for c in seen)


def _score_hlo(params) -> str:
  """The compiled scoring program (31 positions, batch 1) with bfloat16 step weights, traced
  afresh (whether the CPU kernel is used is decided when tracing)."""
  from lcsm_jax.decoding import decoder as decoder_lib
  jax.clear_caches()
  decoder = decoding.Decoder(params, CONFIG, max_length=32, step_weights="bfloat16", **ENGINE)
  state = decoder.prefill(np.ones((1, 1), np.int32))
  ids = jnp.ones((1, 31), jnp.int32)
  return decoder_lib._PROGRAMS["score"].lower(
      decoder.params, decoder.tables, state, ids, engine=decoder.engine(1)).compile().as_text()


KERNELS = {(CONFIG.d_model, 3 * CONFIG.d_model), (CONFIG.d_model, CONFIG.d_model),
           (CONFIG.d_model, CONFIG.d_inner), (CONFIG.d_inner, CONFIG.d_model)}
# the operands' types of the kernel's custom call, from its operand_layout_constraints
CUSTOM_CALL = re.compile(r'custom_call_target="lcsm_bf16_matmul", '
                         r"operand_layout_constraints=\{(\w+\[[\d,]*\])\{[\d,]*\}, "
                         r"(\w+\[[\d,]*\])\{")


def _converted_kernels(text: str) -> set:
  return {(int(r), int(c)) for r, c in re.findall(r"f32\[(\d+),(\d+)\]\{[\d,]*\} convert\(", text)
          } & KERNELS


def _loops(hlo: str) -> list[str]:
  loops = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)
  assert loops
  return [_called(hlo, body) for body in loops]


def test_token_loop_reads_bfloat16_kernels_through_the_cpu_kernel(params):
  """On CPU the token loop multiplies by the bfloat16 kernels as stored, in the
  `cpu_kernels.bf16_matmul` custom call (x float32, kernel bfloat16), and the program converts
  no kernel to float32 anywhere (XLA:CPU's dot would read a float32 copy)."""
  import cpu_kernels
  if not cpu_kernels.available():
    pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")
  hlo = _score_hlo(params)
  read = set()
  for text in _loops(hlo):
    for operands in CUSTOM_CALL.findall(text):
      x, kernel = operands
      assert x.startswith("f32[") and kernel.startswith("bf16["), operands
      read.add(tuple(int(d) for d in kernel[5:-1].split(",")))
  assert read == KERNELS, f"kernels read by the custom call: {read}"
  assert not _converted_kernels(hlo), "a bfloat16 kernel is converted to float32"


def test_without_the_cpu_kernel_conversions_stay_out_of_the_loop(params, monkeypatch):
  """Where the CPU kernel is unavailable (faked here), a warning names the reason, the step
  takes XLA's dot, and the float32 conversions of the kernels happen once, outside the token
  loop (the loop reads float32 copies). Logits are still those of the rounded model."""
  import cpu_kernels
  from lcsm_jax.models.hyena import modules
  matmul_lib = importlib.import_module("cpu_kernels.bf16_matmul")
  monkeypatch.setattr(matmul_lib.KERNEL, "state", {"ok": False, "reason": "BuildError: faked"})
  monkeypatch.setattr(modules, "_warned_unavailable", False)
  assert not cpu_kernels.available()
  with pytest.warns(RuntimeWarning, match=r"bfloat16 step weights are read as float32 on this "
                                          r"machine .*unavailable: BuildError: faked"):
    hlo = _score_hlo(params)
  assert "lcsm_bf16_matmul" not in hlo
  assert _converted_kernels(hlo) == KERNELS
  for text in _loops(hlo):
    assert not _converted_kernels(text), "a kernel is converted inside the token loop"
  got = lcsm_jax.teacher_forced_logits(params, CONFIG, TOKENS_FOR_FALLBACK, prompt_length=2,
                                       step_weights="bfloat16", **ENGINE)
  reference = _forward(_rounded(params), TOKENS_FOR_FALLBACK)
  chex.assert_trees_all_close(np.asarray(got), reference, rtol=1e-5, atol=1e-5)
  jax.clear_caches()  # later tests trace with the kernel again


TOKENS_FOR_FALLBACK = np.arange(20, dtype=np.int32).reshape(2, 10) % CONFIG.vocab_size


MESH_CHECK = """
import os, re
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
import lcsm_jax
from lcsm_jax.decoding import decoder as decoder_lib
from lcsm_jax.models.hyena import HyenaConfig, init_params
config = HyenaConfig(vocab_size=13, d_model=16, n_layer=2, d_inner=32, l_max=40, order=2,
                     filter_order=8, emb_dim=3)
params = init_params(config, jax.random.key(0))
ids = np.asarray(jax.random.randint(jax.random.key(5), (4, 12), 0, 13))
mesh = jax.make_mesh((2, 4), ("data", "model"))
kw = dict(prompt_length=3, step_weights="bfloat16", tau=2, chunk=8)
want = np.asarray(lcsm_jax.teacher_forced_logits(params, config, ids, **kw))
got = np.asarray(lcsm_jax.teacher_forced_logits(params, config, ids, mesh=mesh, **kw))
print("error", float(np.abs(got - want).max() / np.abs(want).max()))
decoder = lcsm_jax.Decoder(params, config, max_length=32, step_weights="bfloat16", mesh=mesh,
                           tau=2, chunk=8)
state = decoder.prefill(np.ones((2, 1), np.int32))
hlo = decoder_lib._PROGRAMS["score"].lower(decoder.params, decoder.tables, state,
                                           jax.numpy.ones((2, 31), jax.numpy.int32),
                                           engine=decoder.engine(2)).compile().as_text()
print("custom calls", hlo.count("lcsm_bf16_matmul"))
print("all-gathers", len(re.findall(r"all-gather(?:-start)?\\(", hlo)))
"""


def test_mesh_keeps_xla_dots():
  """On a (2, 4) mesh of host devices the step keeps XLA's dots (which XLA splits over the
  mesh; it would all-gather a custom call's operands, the kernels, at every token) and the
  logits equal one device's."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", MESH_CHECK], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
  assert float(lines["error"]) <= 1e-5, out.stdout
  assert lines["custom calls"] == "0", out.stdout
  assert int(lines["all-gathers"]) <= 1, out.stdout
