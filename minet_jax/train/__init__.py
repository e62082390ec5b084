"""Training MI-Net: the base config, state, jitted step, checkpoints, data parallelism,
the loop.

    from minet_jax.train import config_file, train_and_evaluate
    config = config_file.load_module("configs/quickstart.py").get_config()
    train_and_evaluate(config, "workdirs/quickstart")

See docs/TRAINING.md.
"""

from __future__ import annotations

from minet_jax.train.checks import ConfigError, validate_config
from minet_jax.train.loop import DiskFullError, NonFiniteLossError, train_and_evaluate
from minet_jax.train.state import TrainState, create_train_state
from minet_jax.train.step import make_train_step, reconstruction_loss, train_step

__all__ = [
    "ConfigError",
    "DiskFullError",
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "make_train_step",
    "reconstruction_loss",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
