"""Trains MI-Net: `minet_jax.train.cli` (also installed as ``minet-train``).

    python train.py --config configs/quickstart.py --workdir workdirs/quickstart
    python train.py --help
"""

from minet_jax.train import cli

if __name__ == "__main__":
  cli.run()
