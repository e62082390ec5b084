"""MI-Net on RESIDE ITS as the authors' released training script runs it (a GPU job).

    python train.py --config configs/its_authors.py --workdir workdirs/its_authors

configs/its.py with the three settings in which the authors' ``main.py``
(Jiawei-Shen/MI-Net) departs from the paper: Adam at a constant 0.01 (their x0.6
``MultiStepLR`` is never stepped), and their loss ``torch.norm(output - gt)`` on 0..255
pixel values. On the same weights and batch, this config's loss, gradients and first
three Adam steps equal those of the authors' code (tests/test_training_parity.py
checks them against the authors' PyTorch figures in ``shared/parity``).
"""

from __future__ import annotations

import pathlib

from minet_jax.train import config_file

# configs/its.py beside this file, loaded by its path: a copy of this folder works anywhere.
its = config_file.load_module(pathlib.Path(__file__).with_name("its.py"))


def get_config():
  config = its.get_config()
  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule = "constant"
  config.loss = "l2"
  return config
