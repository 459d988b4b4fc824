"""Reliability of the project's own checkpoint format (issue 12): non-finite weights are refused
on save, load and by `lcsm-generate`; config.json is bound to its weights by a SHA-256, so a
config.json from another save (two processes saving to one directory) is refused, never loaded
with the wrong weights; saving over a HyenaDNA checkpoint needs `overwrite=True`."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lcsm_jax
from lcsm_jax import cli
from lcsm_jax import validation
from lcsm_jax.errors import CheckpointError
from lcsm_jax.io import native
from lcsm_jax.io.native import load_params, read_metadata, save_params
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.validation import check_finite, non_finite_paths

try:
  import fcntl
except ImportError:
  fcntl = None
needs_flock = pytest.mark.skipif(fcntl is None, reason="directory locks need fcntl.flock")

ROOT = pathlib.Path(__file__).parent.parent
# Two configs with the same shapes (a mix of one's config.json with the other's weights passes
# every shape check: only the recorded hash can catch it) and one with other shapes.
CFG_A = HyenaConfig(vocab_size=12, d_model=8, n_layer=1, d_inner=16, l_max=16, filter_order=8)
CFG_B = CFG_A.replace(modulation_shift=0.25, layer_norm_epsilon=1e-6)
CFG_C = CFG_A.replace(d_model=16)


def _numpy(params):
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def params_a():
  return _numpy(lcsm_jax.init_params(CFG_A, jax.random.key(0)))


@pytest.fixture(scope="module")
def params_b():
  return _numpy(lcsm_jax.init_params(CFG_B, jax.random.key(1)))


@pytest.fixture(scope="module")
def params_c():
  """CFG_C's shapes, drawn by NumPy (no initialiser to compile)."""
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(lambda: lcsm_jax.init_params(CFG_C, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def _assert_same(params, expected):
  got, want = _flat(params), _flat(expected)
  assert set(got) == set(want)
  for key in want:
    assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype, key
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def _with(params, changes):
  """A copy of `params` with entries changed: {'/'-joined path: (index, value)}."""
  flat = {k: np.array(v) for k, v in _flat(params).items()}
  for path, (index, value) in changes.items():
    flat[path][index] = value
  return traverse_util.unflatten_dict(flat, sep="/")


def _rewrite_weights(directory, change):
  """Rewrites directory/params.safetensors as safetensors itself would (same metadata, hash
  included), with `change(flat arrays)` applied: no check of save_params on the way."""
  weights = str(directory / "params.safetensors")
  with safe_open(weights, framework="np") as f:
    metadata = f.metadata()
  flat = load_file(weights)
  change(flat)
  save_file(flat, weights, metadata=metadata)


def _put_nan_and_inf(flat):
  flat["params/ln_f/scale"][3] = np.nan
  flat["params/stack/blocks/mlp/fc1/kernel"][0, 1, 2] = -np.inf


# -- non-finite parameters ---------------------------------------------------------------------


def test_non_finite_paths_and_check_finite(params_a):
  assert non_finite_paths(params_a) == []
  check_finite(params_a)  # no error
  bad = _with(params_a, {"params/stack/blocks/mlp/fc1/kernel": ((0, 1, 2), np.inf),
                         "params/ln_f/scale": (slice(0, 2), np.nan)})
  # In tree order (sorted keys: 'ln_f' before 'stack'), every offending path.
  assert non_finite_paths(bad) == ["params/ln_f/scale", "params/stack/blocks/mlp/fc1/kernel"]
  with pytest.raises(CheckpointError) as info:
    check_finite(bad, name="the weights")
  message = str(info.value)
  assert message.startswith("the weights hold non-finite values, which would make every "
                            "output NaN:")
  assert "params/ln_f/scale holds non-finite values (NaN or inf): 2 of 8" in message
  assert "params/stack/blocks/mlp/fc1/kernel holds non-finite values (NaN or inf): 1 of 128" \
      in message


def test_non_finite_paths_bfloat16_and_jax_arrays(params_a):
  bad = _with(params_a, {"params/embedder/embedding": ((5, 0), -np.inf)})
  as_bf16_numpy = jax.tree.map(lambda x: x.astype(jnp.bfloat16), bad)
  as_bf16_jax = lcsm_jax.cast_params(CFG_A, bad, jnp.bfloat16)
  for tree in (as_bf16_numpy, as_bf16_jax, jax.tree.map(jnp.asarray, bad)):
    assert non_finite_paths(tree) == ["params/embedder/embedding"]
  assert non_finite_paths(lcsm_jax.cast_params(CFG_A, params_a, jnp.bfloat16)) == []
  # Integer leaves are not this function's business (check_params reports their dtype).
  assert non_finite_paths({"a": np.arange(3), "b": np.zeros((0,), np.float32)}) == []
  # The reduction used for arrays on an accelerator, run here on the CPU.
  flags = validation._all_finite_on_device(
      [jnp.ones(3, jnp.bfloat16), jnp.array([1.0, jnp.nan]), jnp.array([jnp.inf])])
  assert [bool(f) for f in flags] == [True, False, False]


def test_non_finite_paths_refuses_traced_values(params_a):
  with pytest.raises(TypeError, match="needs concrete arrays, got a traced value at "
                                      "params/embedder/embedding"):
    jax.jit(non_finite_paths)(params_a)


def test_save_params_refuses_non_finite_parameters(tmp_path, params_a, params_b):
  save_params(tmp_path, CFG_A, params_a)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  bad = _with(params_b, {"params/ln_f/scale": (0, np.nan)})
  with pytest.raises(CheckpointError, match=r"^the parameters to save hold non-finite values, "
                                            r"which would make every output NaN:\n  "
                                            r"params/ln_f/scale holds non-finite values"):
    save_params(tmp_path, CFG_B, bad)
  # Nothing was written: the earlier (good) checkpoint is intact.
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  with pytest.raises(CheckpointError, match="params/ln_f/scale holds non-finite"):
    save_params(tmp_path / "new", CFG_B, lcsm_jax.cast_params(CFG_B, bad, jnp.bfloat16))
  assert not (tmp_path / "new" / "params.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_params_refuses_non_finite_weights(tmp_path, params_a, dtype):
  params = params_a if dtype == "float32" else lcsm_jax.cast_params(CFG_A, params_a, jnp.bfloat16)
  save_params(tmp_path, CFG_A, params)
  _rewrite_weights(tmp_path, _put_nan_and_inf)
  with pytest.raises(CheckpointError) as info:
    load_params(tmp_path)
  message = str(info.value)
  assert message.startswith(f"the parameters in {tmp_path / 'params.safetensors'} hold "
                            "non-finite values")
  assert "params/ln_f/scale holds non-finite values (NaN or inf): 1 of 8" in message
  assert "params/stack/blocks/mlp/fc1/kernel holds non-finite values (NaN or inf): 1 of 128" \
      in message


def _run_cli(capsys, *argv):
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_cli_refuses_a_checkpoint_with_nan(tmp_path, capsys, fixture_dir):
  config, params = lcsm_jax.load_hyenadna(fixture_dir)
  save_params(tmp_path / "ckpt", config, params)
  _rewrite_weights(tmp_path / "ckpt", lambda flat: flat["params/ln_f/scale"].__setitem__(0, np.nan))
  code, out, err = _run_cli(capsys, "--checkpoint", str(tmp_path / "ckpt"), "--num_tokens", "3")
  assert code == 2, err
  assert err.startswith("lcsm-generate: error: the parameters in "), err
  assert "params/ln_f/scale holds non-finite values (NaN or inf): 1 of 64" in err
  assert "Traceback" not in err
  assert out == ""  # no text (it used to print NUL bytes and exit 0)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(layer_norm_epsilon=-1), r"field 'layer_norm_epsilon': "
                                                r"HyenaConfig\.layer_norm_epsilon must be > 0"),
    (lambda c: c.update(layer_norm_epsilon=float("nan")), r"'layer_norm_epsilon': .* must be "
                                                          r"finite .*got nan"),
    (lambda c: c["layer"].update(shift=float("nan")), r"field 'layer\.shift': "
                                                      r"HyenaConfig\.modulation_shift must be "
                                                      r"finite"),
    (lambda c: c["layer"].update(target=0), r"field 'layer\.target': HyenaConfig\.decay_target "
                                            r"must lie in \(0, 1\)"),
    (lambda c: c["layer"].update(target=-1), r"field 'layer\.target': .*got -1\.0\."),
])
def test_cli_refuses_bad_config_values(tmp_path, capsys, fixture_dir, change, match):
  """Issue 12: these gave NaN logits (exit 0) or `error: math domain error`."""
  shutil.copy(fixture_dir / "model.safetensors", tmp_path / "model.safetensors")
  config = json.loads((fixture_dir / "config.json").read_text())
  change(config)
  (tmp_path / "config.json").write_text(json.dumps(config))
  code, out, err = _run_cli(capsys, "--checkpoint", str(tmp_path), "--num_tokens", "3")
  assert code == 2, err
  assert err.startswith(f"lcsm-generate: error: {tmp_path / 'config.json'}: HyenaDNA config "
                        "field "), err
  assert out == ""
  assert re.search(match, err), err


# -- config.json bound to its weights -----------------------------------------------------------


def test_save_records_the_config_hash(tmp_path, params_a):
  save_params(tmp_path, CFG_A, params_a, metadata={"step": "7"})
  with safe_open(str(tmp_path / "params.safetensors"), framework="np") as f:
    recorded = f.metadata()[native.CONFIG_SHA256]
  assert recorded == hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
  assert read_metadata(tmp_path) == {"step": "7"}  # internal keys are hidden
  for key in (native.CONFIG_SHA256, native.BFLOAT16_AS_FLOAT32):
    with pytest.raises(ValueError, match=rf"the metadata keys \['{key}'\] are reserved"):
      save_params(tmp_path, CFG_A, params_a, metadata={key: "x"})


@pytest.mark.parametrize("other", ["same-shapes", "other-shapes"])
def test_config_json_of_another_save_is_refused(tmp_path, params_a, params_b, params_c, other):
  """The mix two concurrent saves can leave: one save's weights, the other's config.json."""
  cfg, params = (CFG_B, params_b) if other == "same-shapes" else (CFG_C, params_c)
  save_params(tmp_path / "a", CFG_A, params_a)
  save_params(tmp_path / "b", cfg, params)
  shutil.copy(tmp_path / "b" / "config.json", tmp_path / "a" / "config.json")
  with pytest.raises(CheckpointError,
                     match=rf"^{tmp_path / 'a' / 'config.json'} does not belong to these "
                           r"weights: .*params\.safetensors records the SHA-256 of the "
                           r"config\.json saved with it .* written by different saves "
                           r"\(two processes saving to this directory at once"):
    load_params(tmp_path / "a")
  # The other mix (b's weights with a's config.json) is refused as well.
  save_params(tmp_path / "a", CFG_A, params_a)
  shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
  with pytest.raises(CheckpointError, match="does not belong to these weights"):
    load_params(tmp_path / "b")
  # Each directory's own pair loads.
  save_params(tmp_path / "b", cfg, params)
  assert load_params(tmp_path / "a")[0] == CFG_A and load_params(tmp_path / "b")[0] == cfg


def test_edited_config_json_is_refused_but_old_checkpoints_load(tmp_path, params_a):
  save_params(tmp_path, CFG_A, params_a)
  config_json = tmp_path / "config.json"
  original = config_json.read_bytes()
  config_json.write_text(json.dumps(json.loads(original)))  # same config, other bytes
  with pytest.raises(CheckpointError, match="does not belong to these weights"):
    load_params(tmp_path)
  # A checkpoint written before the hash was recorded (no metadata key) still loads.
  _rewrite_weights(tmp_path, lambda flat: None)
  weights = str(tmp_path / "params.safetensors")
  with safe_open(weights, framework="np") as f:
    metadata = {k: v for k, v in f.metadata().items() if k != native.CONFIG_SHA256}
  save_file(load_file(weights), weights, metadata=metadata)
  config, params = load_params(tmp_path)
  assert config == CFG_A
  _assert_same(params, params_a)


# -- saving over a checkpoint save_params did not write -----------------------------------------


def test_save_refuses_to_replace_a_hyenadna_config(tmp_path, fixture_dir, params_a):
  hyena = tmp_path / "hyena"
  shutil.copytree(fixture_dir, hyena)
  original = (hyena / "config.json").read_bytes()
  with pytest.raises(FileExistsError,
                     match=rf"^{hyena} holds a checkpoint not written by save_params "
                           r"\(model\.safetensors, config\.json\); saving there would replace "
                           r"its config\.json\. Save to another directory, or pass "
                           r"overwrite=True"):
    save_params(hyena, CFG_A, params_a)
  assert (hyena / "config.json").read_bytes() == original
  assert not (hyena / "params.safetensors").exists()
  lcsm_jax.load_hyenadna(hyena)  # still the HyenaDNA checkpoint it was
  save_params(hyena, CFG_A, params_a, overwrite=True)
  assert load_params(hyena)[0] == CFG_A
  # A lone config.json (no params.safetensors beside it) is not ours either.
  lone = tmp_path / "lone"
  lone.mkdir()
  (lone / "config.json").write_bytes(original)
  with pytest.raises(FileExistsError, match=r"holds a checkpoint not written by save_params "
                                            r"\(config\.json\)"):
    save_params(lone, CFG_A, params_a)
  assert (lone / "config.json").read_bytes() == original
  with pytest.raises(TypeError, match="overwrite must be True or False, got 'yes'"):
    save_params(lone, CFG_A, params_a, overwrite="yes")


def test_overwriting_an_own_checkpoint_is_allowed(tmp_path, params_a, params_c):
  (tmp_path / "metrics.json").write_text("{}")  # other files beside it are fine
  save_params(tmp_path, CFG_A, params_a)
  save_params(tmp_path, CFG_C, params_c)
  config, params = load_params(tmp_path)
  assert config == CFG_C
  _assert_same(params, params_c)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "config.json", "metrics.json", "params.safetensors"]


# -- concurrency ---------------------------------------------------------------------------------

def _blocked_while_locked(directory, lock, call):
  """Runs `call` in a thread while `lock` (LOCK_EX / LOCK_SH) is held on `directory`: returns
  (still running after 0.3 s, result or exception after the lock is released)."""
  fd = os.open(directory, os.O_RDONLY)
  fcntl.flock(fd, lock)
  result = {}

  def target():
    try:
      result["value"] = call()
    except Exception as e:  # reported to the test
      result["value"] = e

  thread = threading.Thread(target=target)
  try:
    thread.start()
    time.sleep(0.3)
    waited = thread.is_alive()
  finally:
    os.close(fd)
  thread.join(timeout=30)
  return waited, result.get("value")


@needs_flock
def test_load_waits_for_a_save_and_save_for_a_load(tmp_path, params_a, params_c):
  save_params(tmp_path, CFG_A, params_a)
  waited, value = _blocked_while_locked(tmp_path, fcntl.LOCK_EX, lambda: load_params(tmp_path))
  assert waited and value[0] == CFG_A
  waited, value = _blocked_while_locked(tmp_path, fcntl.LOCK_SH,
                                        lambda: save_params(tmp_path, CFG_C, params_c))
  assert waited and value is None
  assert load_params(tmp_path)[0] == CFG_C
  # Readers share the lock: a load is not held up by another reader.
  waited, value = _blocked_while_locked(tmp_path, fcntl.LOCK_SH, lambda: load_params(tmp_path))
  assert not waited and value[0] == CFG_C


WRITER = r"""
import sys, time
import numpy as np
from flax import traverse_util
from lcsm_jax.io import native
from lcsm_jax.models.hyena.config import HyenaConfig
path, params_file, config_file, seconds = sys.argv[1:]
config = HyenaConfig.from_json_file(config_file)
with np.load(params_file) as data:
  params = traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
native.save_params(params_file + ".warm-up", config, params)  # traces the shape check
print("ready", flush=True)
sys.stdin.readline()
end, rounds = time.monotonic() + float(seconds), 0
while time.monotonic() < end:
  native.save_params(path, config, params)
  rounds += 1
print(rounds, flush=True)
"""


@needs_flock
def test_concurrent_saves_never_load_as_a_mix(tmp_path, monkeypatch, params_a, params_b):
  """Two processes save different configs (same shapes, different weights) to one directory
  for 1 s while this process loads it without taking the lock (so it can read between a
  save's two renames): every load is one save's consistent pair, or a CheckpointError saying
  the config.json belongs to other weights. The writers lock the directory, so the final state
  is one save's pair."""
  shared = tmp_path / "shared"
  save_params(shared, CFG_A, params_a)
  writers = []
  for name, cfg, params in (("a", CFG_A, params_a), ("b", CFG_B, params_b)):
    np.savez(tmp_path / f"{name}.npz", **_flat(params))
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg.to_hyenadna_dict()))
    writers.append(subprocess.Popen(
        [sys.executable, "-c", WRITER, str(shared), str(tmp_path / f"{name}.npz"),
         str(tmp_path / f"{name}.json"), "1.0"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
  try:
    for writer in writers:
      assert writer.stdout.readline() == "ready\n"
    for writer in writers:
      writer.stdin.write("go\n")
      writer.stdin.flush()
    monkeypatch.setattr(native, "_USE_LOCKS", False)
    expected = {CFG_A: params_a, CFG_B: params_b}
    loaded, refused = {CFG_A: 0, CFG_B: 0}, 0
    while any(writer.poll() is None for writer in writers):
      try:
        config, params = load_params(shared)
      except CheckpointError as e:
        assert "config.json does not belong to these weights" in str(e), str(e)
        refused += 1
        continue
      assert config in expected, config
      assert params["params"]["ln_f"]["scale"].shape == (config.d_model,)
      _assert_same(params, expected[config])  # the weights saved with this very config
      loaded[config] += 1
    rounds = [int(writer.communicate(timeout=30)[0]) for writer in writers]
  finally:
    for writer in writers:
      writer.kill()
  assert [writer.returncode for writer in writers] == [0, 0]
  assert min(rounds) > 0 and sum(loaded.values()) > 0, (rounds, loaded, refused)
  monkeypatch.setattr(native, "_USE_LOCKS", True)
  config, params = load_params(shared)  # the last save's complete pair
  _assert_same(params, expected[config])
