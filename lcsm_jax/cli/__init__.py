"""The console commands, one module each, with what they share in `common`:

  lcsm-generate   `generate.main`: sample from the shipped byte-level model or a checkpoint
                  (also `python -m lcsm_jax.cli`)

`lcsm_jax.cli.main` is `lcsm-generate`'s entry point, as when the command line was one module.
"""

from lcsm_jax.cli.generate import main

__all__ = ["main"]
