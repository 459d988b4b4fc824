"""Generation on a device mesh (issue 15). The checks need 8 host CPU devices, a count fixed when
JAX starts its backends, so each runs `tests/mesh_checks.py` in a process of its own (with
XLA_FLAGS=--xla_force_host_platform_device_count=8); what they check is in that file. In this
process: the rules that need no mesh (logical specs, the CLI's --mesh parser)."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import pytest

from lcsm_jax.cli import common
from lcsm_jax.decoding import sharding
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.models.hyena import HyenaConfig, init_params
from lcsm_jax.models.hyena.online import HyenaOnline

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
EIGHT = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")


def run_checks(*args: str, timeout: int = 600) -> str:
  result = subprocess.run([sys.executable, str(HERE / "mesh_checks.py"), *args], cwd=ROOT,
                          env=EIGHT, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert result.stdout.rstrip().endswith("all ok"), result.stdout
  return result.stdout


@pytest.mark.parametrize("shape", [pytest.param("8,1", marks=pytest.mark.slow),
                                   pytest.param("1,8", marks=pytest.mark.slow), "2,4"])
def test_every_strategy_gives_one_devices_tokens_on_a_mesh(shape):
  # ~1.5 min of CPU per mesh shape: (8, 1) and (1, 8, with batch 1 and 8) run with LCSM_RUN_SLOW=1
  out = run_checks("exactness", shape)
  assert out.count("tokens equal") == 5 * 2 * (2 if shape == "1,8" else 1)


def test_rollout_functions_and_refusals_on_a_mesh():
  out = run_checks("rollout")
  # 5 strategies x 2 prompt lengths, and flash smoothed
  assert out.count("ok rollout") == 11 and out.count("ok refused") == 3


def test_no_collectives_in_the_mixing():
  out = run_checks("hlo")
  assert out.count("tables 0") == 5


def test_checkpoint_loads_straight_into_its_shards():
  out = run_checks("load")
  assert "each device read its slice" in out and "keeps the loaded shards in place" in out
  assert "ok refused" in out


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["1,4", "2,2"])
def test_two_processes_generate_one_devices_tokens(shape):
  # ~35 s on 2 busy cores: jax.distributed with a localhost coordinator, 2 CPU devices each
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  script = str(HERE / "multiprocess_check.py")
  procs = [subprocess.Popen([sys.executable, script, str(i), port, "2", shape], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-5000:]
    assert "tokens equal" in out, out
  assert outs[0][0].split("tokens equal")[1] == outs[1][0].split("tokens equal")[1]


def test_cli_generates_on_a_mesh_the_text_of_one_device():
  base = ["-m", "lcsm_jax.cli", "--num_tokens", "12", "--temperature", "0",
          "--prompt", "def f(x):", "--tau", "16", "--chunk_tokens", "5"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  one = subprocess.run([sys.executable, *base], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  many = subprocess.run([sys.executable, *base, "--mesh", "data=2,model=4"], cwd=ROOT,
                        env=EIGHT, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0 and many.returncode == 0, one.stderr + many.stderr
  assert many.stdout == one.stdout and len(one.stdout) > len("def f(x):")
  refused = subprocess.run([sys.executable, *base, "--mesh", "model=16"], cwd=ROOT, env=EIGHT,
                           capture_output=True, text=True, timeout=600)
  assert refused.returncode == 2
  assert "--mesh data=1,model=16 needs 16 devices, but JAX sees 8" in refused.stderr
  assert "--host_devices 16" in refused.stderr


def test_mesh_parser():
  assert common.mesh_shape("data=2,model=4") == (("data", 2), ("model", 4))
  assert common.mesh_shape("model=8") == (("model", 8),)
  for bad in ("data=2,data=2", "rows=2", "data=0", "data", "data=x"):
    with pytest.raises(argparse.ArgumentTypeError):
      common.mesh_shape(bad)


def test_logical_specs_and_model_partitions():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("m",))
  rule = sharding.Sharding(mesh, None, "m")
  assert rule.spec(sharding.TIME_MAJOR) == P(None, None, None, "m")
  with pytest.raises(ValueError, match="logical partition entries"):
    rule.spec(P("rows"))
  with pytest.raises(ValueError, match="data axis 'data' is not an axis"):
    sharding.Sharding(mesh)
  stack = ConvStack(2, 8, 16)
  assert stack.param_partition(stack.init(jax.random.key(0)))["taps"] == P(None, None,
                                                                           "channels")
  config = HyenaConfig(vocab_size=13, d_model=8, n_layer=2, d_inner=16, l_max=16)
  specs = HyenaOnline(config).param_partition(init_params(config, jax.random.key(0)))
  blocks = specs["params"]["stack"]["blocks"]
  assert specs["params"]["embedder"]["embedding"] == P(None, "channels")
  assert blocks["mixer"]["in_proj"]["kernel"] == P(None, "channels", None)
  assert blocks["mlp"]["fc2"]["kernel"] == P(None, None, "channels")
  assert blocks["mixer"]["short_conv"]["kernel"] == P()
