"""The architecture as the paper's text describes it: T = 12, dilations 1/2/5.

The released code and checkpoint use T = 8 and dilations 1/2/4; this variant exists
to study the difference, not to load the released weights.
"""

from __future__ import annotations

from minet_jax.train import defaults


def get_config():
  config = defaults.get_config()
  # Iterations per IM-block as stated in the paper.
  config.model.iterations = (12, 12, 12)
  # Dilations as stated in the paper (smoothing kernels become 3x3 and 9x9).
  config.model.dilations = (1, 2, 5)
  return config
