"""One entry point for every checkpoint this package reads, shared by the CLI and the API."""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from lcsm_jax.io import hyenadna
from lcsm_jax.io import native
from lcsm_jax.io import pretrained
from lcsm_jax.models.hyena.config import HyenaConfig


def load_checkpoint(path: str | None, mesh: jax.sharding.Mesh | None = None,
                    mesh_axes: tuple[str | None, str | None] = ("data", "model")
                    ) -> tuple[HyenaConfig, Any, str]:
  """(config, params, description): the shipped byte model (path None), a directory written by
  `native.save_params` (config.json + params.safetensors), or a HyenaDNA checkpoint.

  With a `mesh`, a `save_params` directory is loaded straight into its shards
  (`native.load_params(path, mesh, mesh_axes)`: each device reads only its slices); the other
  formats are read whole, and `Decoder(..., mesh=)` places them.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: as `native.load_params` or `hyenadna.load_hyenadna`.
  """
  if path is None:
    config, params, _ = pretrained.load_byte_lm()
    return config, params, "the shipped byte-level LM"
  location = pathlib.Path(path)
  if not location.exists():
    raise FileNotFoundError(f"no checkpoint at {path!r}.")
  own = location.is_dir() and (location / native.OWN_WEIGHTS).is_file() and not any(
      (location / name).exists() for name in hyenadna.WEIGHT_FILES)
  if own:
    config, params = native.load_params(location, mesh, mesh_axes)
  else:
    config, params = hyenadna.load_hyenadna(location)
  return config, params, str(path)
