"""`python -m lcsm_jax.cli`: runs `lcsm-generate`."""

import sys

from lcsm_jax.cli.generate import main

if __name__ == "__main__":
  sys.exit(main())
