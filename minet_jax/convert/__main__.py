"""``python -m minet_jax.convert model_ITS.pth checkpoints/minet_its``."""

import sys

from minet_jax.convert import main

if __name__ == "__main__":
  sys.exit(main())
