"""The stable MI-Net with blocks 2 and 3 both two-stage implicit steps:
`configs/stable_two_stage.py`'s model with block 3 refitted as a two-stage block, the two
earlier runs first, all three in one command.

    python train.py --config configs/stable_sdirk.py --workdir workdirs/stable_sdirk
    python benchmarks/stable_minet.py --stable workdirs/stable_sdirk --time 3

The command first trains `configs/stable_two_stage.py` in ``workdirs/stable_two_stage``
(``init_from``, with ``init_from_config``), which itself first trains `configs/stable.py`
in ``workdirs/stable``; each run that has reached its last step is skipped, and a rerun
after an interruption resumes the run it stopped in.

Block 3 takes two stages of a stiffly accurate SDIRK step at its fraction 0.7
(``model.stages``): k1 = g0 + 0.7 eta f(k1), then y = c + 0.7 eta f(y) with
c = g0 + 0.3 eta f(k1); both stage maps have the Jacobian 0.7 eta df/dg, and the first
is the one-stage block's stage, so the one-stage block's contraction carries over to
it. Its f starts from the one-stage block 3 of ``workdirs/stable_two_stage`` and is
refitted as `configs/stable_block3.py` refits a one-stage block 3: alone
(``train_blocks``), on `configs/stable.py`'s 128 px crops, the model's own solved blocks
1 and 2 giving its input (``teacher_inputs="student"``), the released model's block-3
output the target of the second stage, and the radius hinge (target 0.7) at the first
stage's solution and at that output: 1000 Adam steps from 3e-3, cosine-decayed to 10 %.

Expected result (measured, docs/STABILITY.md "Block 3 as two stages"): after the two
earlier runs (44 and 39 minutes), 1000 steps in 18 minutes (1,103 s, partly beside
another run) on a 2-core x86-64 CPU. On the 10 SOTS samples at full resolution it
scores 34.07 dB / 0.97211 (`configs/stable_two_stage.py`: 33.93 dB; the released model:
36.30 dB); Picard and Anderson solve all 30 (image, block) pairs (5.4 / 18.5 / 18.5
Picard steps, blocks 2 and 3's being both stages'), every block is a contraction at its
solution on all 30, each stage of blocks 2 and 3 included (rho at most 0.70 / 0.92 /
0.87), and a forward pass takes 1.56x the released model's time. The PSNR and speed
targets of a stable MI-Net are not met.
"""

from __future__ import annotations

import pathlib

from minet_jax.train import config_file

# The configs beside this file, loaded by their paths: a copy of this folder works anywhere.
STABLE_TWO_STAGE = pathlib.Path(__file__).resolve().with_name("stable_two_stage.py")
stable_block3 = config_file.load_module(
    pathlib.Path(__file__).resolve().with_name("stable_block3.py"))


def get_config():
  # configs/stable_block3.py's refit of block 3 (its crops, student inputs, steps and
  # learning rate), from configs/stable_two_stage.py's run, with block 3 two-stage too.
  config = stable_block3.get_config()
  config.model.stages = (1, 2, 2)
  config.init_from = "workdirs/stable_two_stage"
  config.init_from_config = str(STABLE_TWO_STAGE)
  return config
