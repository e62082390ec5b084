"""``python -m minet_jax.stability``: runs `minet_jax.stability.cli.main`."""

import sys

from minet_jax.stability.cli import main

if __name__ == "__main__":
  sys.exit(main())
