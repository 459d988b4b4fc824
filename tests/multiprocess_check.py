"""Generation on a mesh spanning two processes (`jax.distributed`, CPU devices, gloo
collectives), run by `tests/test_sharding.py` as two processes on one machine:

  python tests/multiprocess_check.py PROCESS_ID PORT [LOCAL_DEVICES] [DATA,MODEL]

Each process starts `jax.distributed.initialize(coordinator_address="localhost:PORT",
num_processes=2, process_id=PROCESS_ID)` with LOCAL_DEVICES host CPU devices (default 2), builds
a (DATA, MODEL) mesh over all the devices of both processes (default (1, 4): channels split
across the processes; (2, 2): batch rows too), runs a tiny Decoder's greedy generation on it
and on one local device, (its parameters saved by process 0 and loaded by both straight into their shards,
`load_params(path, mesh)`), and prints "tokens equal" when the two agree (exit non-zero
otherwise). With rows split across processes, each process holds its own rows of the result:
`multihost_utils.process_allgather(result.tokens, tiled=True)` gathers them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile


def main(process_id: int, port: int, local_devices: int, shape: tuple[int, int]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", local_devices)
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import lcsm_jax  # pylint: disable=import-outside-toplevel
  from lcsm_jax.models.hyena import HyenaConfig, init_params  # pylint: disable=import-outside-toplevel

  assert jax.process_count() == 2 and jax.device_count() == 2 * local_devices, jax.devices()
  config = HyenaConfig(vocab_size=13, d_model=16, n_layer=2, d_inner=32, l_max=64, order=2,
                       filter_order=8)
  params = init_params(config, jax.random.key(0))
  mesh = jax.make_mesh(shape, ("data", "model"))
  batch = max(2, shape[0])
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (batch, 7), 0, config.vocab_size))
  options = dict(tau=4, check_memory=False)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  one = lcsm_jax.Decoder(jax.device_put(params, local), config, "flash", 24, **options)
  want, _ = one.generate(one.prefill(prompt), 8, temperature=0)
  # the checkpoint loaded straight into the shards of this process's devices
  folder = f"{tempfile.gettempdir()}/lcsm_multiprocess_{port}"
  if process_id == 0:
    lcsm_jax.save_params(folder, config, params)
  multihost_utils.sync_global_devices("saved")
  _, sharded = lcsm_jax.load_params(folder, mesh)
  leaves = jax.tree.leaves(sharded)
  assert all(not x.is_fully_addressable for x in leaves), "arrays not spread over processes"
  held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  print(f"process {process_id}: loaded {len(leaves)} arrays into its shards ({held} bytes held "
        f"here of {sum(x.nbytes for x in leaves)} per copy)", flush=True)
  many = lcsm_jax.Decoder(sharded, config, "flash", 24, mesh=mesh, **options)
  got, _ = many.generate(many.prefill(prompt), 8, temperature=0)
  # with the data axis across processes, each process holds its own rows: gather them to compare
  tokens = np.asarray(multihost_utils.process_allgather(got.tokens, tiled=True))
  assert np.array_equal(tokens, want.tokens), f"process {process_id}: {tokens} vs {want.tokens}"
  print(f"process {process_id} of 2, mesh {dict(mesh.shape)} over {jax.device_count()} devices: "
        f"tokens equal {tokens.tolist()}", flush=True)
  multihost_utils.sync_global_devices("done")
  if process_id == 0:
    shutil.rmtree(folder, ignore_errors=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2,
       tuple(int(n) for n in sys.argv[4].split(",")) if len(sys.argv) > 4 else (1, 4))
