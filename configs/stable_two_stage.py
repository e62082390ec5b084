"""The stable MI-Net with block 2 a two-stage implicit step: `configs/stable_fullres.py`'s
run with a second stage in block 2, `configs/stable.py`'s run first, in one command.

    python train.py --config configs/stable_two_stage.py --workdir workdirs/stable_two_stage
    python benchmarks/stable_minet.py --stable workdirs/stable_two_stage --time 3

The command first trains `configs/stable.py` in ``workdirs/stable`` (``init_from``,
with ``init_from_config``), or resumes it there, unless that run has reached its last
step; a rerun after an interruption resumes whichever of the two runs it stopped in.

A one-stage block answers g0 + eta f(k) from one solved stage k: one evaluation of f
must give the whole step that the released block composes from eight, and block 2
copies the released one worst (docs/STABILITY.md, "What the copies miss"). Here block 2
takes two stages of a stiffly accurate SDIRK step at fraction 0.5
(``model.stages``): k1 = g0 + 0.5 eta f(k1), then y = c + 0.5 eta f(y) with
c = g0 + 0.5 eta f(k1), and answers y; both stage maps have the Jacobian 0.5 eta df/dg.
Everything else is `configs/stable_fullres.py`'s run: block 2 starts from the released
one and trains alone on 24 whole 460 x 620 renders, the matching term being the second
stage's residual at the released model's block output (its first stage solved from the
released block input), and the radius hinge taken at the first stage's solution and at
that output.

Expected result (measured, docs/STABILITY.md "A second stage for block 2"): after
`configs/stable.py`'s 44 minutes, 300 steps in 39 minutes (2,330 s, beside tests) on a
2-core x86-64 CPU, rendering included. On the 10 SOTS samples at full resolution it
scores 33.93 dB / 0.97256 (`configs/stable_block3.py`: 33.48 dB; the released model:
36.30 dB); Picard and Anderson solve all 30 (image, block) pairs (5.4 / 18.5 / 13.9
Picard steps, block 2's being both stages'), every block is a contraction at its
solution on all 30, each stage of block 2 included (rho at most 0.70 / 0.92 / 0.99),
and a forward pass takes 1.40x the released model's time (1.20x for
`configs/stable_block3.py`). The PSNR and speed targets of a stable MI-Net are not met.
"""

from __future__ import annotations

import pathlib

from minet_jax.train import config_file

# configs/stable_fullres.py beside this file, loaded by its path: a copy of this folder
# works anywhere.
stable_fullres = config_file.load_module(
    pathlib.Path(__file__).resolve().with_name("stable_fullres.py"))


def get_config():
  config = stable_fullres.get_config()
  # Block 2 as two stages at its fraction 0.5; blocks 1 and 3 keep one.
  config.model.stages = (1, 2, 1)
  return config
