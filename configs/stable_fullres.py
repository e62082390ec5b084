"""The stable MI-Net with block 2 distilled again, at stage fraction 0.5, on whole
photograph-sized renders: `configs/stable.py`'s run, then this one, in one command.

    python train.py --config configs/stable_fullres.py --workdir workdirs/stable_fullres
    python benchmarks/stable_minet.py --stable workdirs/stable_fullres --time 3

The command first trains `configs/stable.py` in ``workdirs/stable`` (``init_from``,
with ``init_from_config``), or resumes it there, unless that run has reached its last
step; a rerun after an interruption resumes whichever of the two runs it stopped in.

`configs/stable.py` distils every block on 128 px crops, and block 2 with a fraction
above 0.3 then expands on full-size photographs (docs/STABILITY.md, "Where block 2
expands"). This run takes that model (``init_from``: ``workdirs/stable``, or any
workdir or checkpoint of it) with block 2 replaced by the released one
(``init_blocks_from``), gives block 2 the fraction 0.5 and trains it alone
(``train_blocks``: blocks 1 and 3 and every other layer keep their weights bit for bit)
on whole 460 x 620 renders, the size of the SOTS photographs, so that the matching term
and the radius hinge see a whole image: 24 rendered rooms with a camera exposure
(1.5, 3), one haze each, one render per step, the released model as the teacher
(``"its"``: fetched once and cached, or a converted folder or the .pth).

Expected result (measured, docs/STABILITY.md "Block 2 on whole full-resolution
renders"): after `configs/stable.py`'s 44 minutes, 300 steps in 14 minutes (830 s,
partly beside tests) on a 2-core x86-64 CPU, rendering included. On the 10 SOTS
samples at full resolution it scores 33.46 dB / 0.97124 (`configs/stable.py`:
32.09 dB; the released model: 36.30 dB); Picard and
Anderson solve all 30 (image, block) pairs (5.4 / 12.2 / 13.8 Picard steps), and a
forward pass takes 1.22x the released model's time. Its blocks are contractions at
their solutions on 29 of the 30 pairs: block 3, trained by `configs/stable.py` on the
released block 2's outputs, reaches rho 1.005 on `1404_9`; `configs/stable_block3.py`
refits it behind this run. The PSNR and speed targets of a stable MI-Net are not met.
"""

from __future__ import annotations

import pathlib

from minet_jax.train import config_file

# configs/stable.py beside this file, loaded by its path: a copy of this folder works anywhere.
STABLE = pathlib.Path(__file__).resolve().with_name("stable.py")
stable = config_file.load_module(STABLE)


def get_config():
  config = stable.get_config()
  # Block 2 takes its step at fraction 0.5 (0.3 in configs/stable.py), starting from the
  # released block: the one trained for 0.3 is a worse start (docs/STABILITY.md). Its
  # hinge, now over whole photograph-sized images, has block 1's target, and weighs 4.
  config.model.stage_fraction = (0.3, 0.5, 0.7)
  config.model.contractive_target = (0.85, 0.85, 0.7)
  config.model.contractive_weight = 4.0
  # configs/stable.py's run: trained (or finished) there first when it is not yet.
  config.init_from = "workdirs/stable"
  config.init_from_config = str(STABLE)
  config.init_blocks_from = ("", "its", "")
  config.teacher = "its"
  config.train_blocks = (2,)
  # Whole renders at the size of the SOTS photographs, some with saturated areas.
  config.data.synthetic.image_size = (460, 620)
  config.data.synthetic.train_rooms = 24
  config.data.synthetic.hazes_per_scene = 1
  config.data.synthetic.motorcycle_views = 0
  config.data.synthetic.exposure_range = (1.5, 3.0)
  config.data.crop_size = 0
  config.data.batch_size = 1
  config.data.eval_batch_size = 2
  config.optimizer.learning_rate = 3e-3
  config.optimizer.decay_steps = 300
  config.num_train_steps = 300
  config.checkpoint_every = 100
  return config
