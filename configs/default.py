"""The base config as a config file: the released architecture, the paper's recipe.

    python train.py --config configs/default.py --workdir workdirs/default

The fields, their defaults and what each means are in `minet_jax.train.defaults`; the
other files here start from it. As it stands this trains on the embedded synthetic set
for the paper's 350k steps, a GPU job; configs/its.py is the paper's run on RESIDE ITS.
Expected: not measured here.
"""

from __future__ import annotations

from minet_jax.train import defaults


def get_config():
  return defaults.get_config()
