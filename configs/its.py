"""MI-Net on RESIDE ITS, the paper's recipe (a GPU job).

    python -m minet_jax.data.builders reside_its --manual_dir ~/data/RESIDE
    python -m minet_jax.data.builders reside_sots/indoor --manual_dir ~/data/RESIDE
    python train.py --config configs/its.py --workdir workdirs/its

Expected: not measured here (one step on 8 full ITS images needs a GPU to be
practical). For scale, the authors' released weights, trained by their script below,
score 36.30 dB PSNR / 0.977 SSIM on the SOTS indoor sample (docs/PRETRAINED.md).

The base config (`minet_jax.train.defaults`) already is the paper's recipe on the released
architecture (T = 8, dilations 1/2/4, BGR 0..255 input, so ``init_from`` can take the
converted released weights as they are): Adam (betas 0.9/0.999, no clipping), learning
rate 1e-3 multiplied by 0.1 every 20k steps, 350k steps, batch 8, full images, MSE
loss, validation and a checkpoint every 5k steps (Shen et al., "Implicit Euler ODE
Networks for Single-Image Dehazing", CVPRW 2020). Taken literally that schedule is
1e-7 from 80k steps on and 1e-8 from 100k, so most of the 350k steps barely move the weights; raise
``--config.optimizer.decay_steps`` to spread the decay if that is not what you want.
This file only says where the data is and how it is read.

The authors' released training script (Jiawei-Shen/MI-Net, ``main.py``) differs:
  * learning rate 0.01 (``--lr`` default), Adam betas (0.9, 0.999);
  * a ``MultiStepLR`` schedule x0.6 every 10 epochs (``--step 10``, gamma 0.6), which
    is built but never stepped in their loop, so as released the rate stays 0.01;
  * batch 8 (``--batchSize``), 220 epochs (the released weights are epoch 175,
    about 306k steps of 1749 per 13,990-image epoch), full images, no augmentation;
  * loss ``torch.norm(output - gt)``: the unsquared L2 norm of the whole batch's
    error on the 0..255 BGR scale (``config.loss = "l2"`` here);
  * ``--clip`` and ``--weight-decay`` are parsed but unused.
configs/its_authors.py is their run: learning rate 0.01, constant, loss "l2"; its
gradients and Adam steps equal theirs (tests/test_training_parity.py).

Fine-tuning the converted released weights is one field:
    --config.init_from=checkpoints/minet_its   (a `python -m minet_jax.convert` output)
"""

from __future__ import annotations

from minet_jax.train import defaults


def get_config():
  config = defaults.get_config()
  # Training set: RESIDE ITS (13,990 hazy 620x460 images of 1,399 clear ones).
  config.data.name = "reside_its"
  # Validation: SOTS indoor (500 images), the paper's indoor benchmark.
  config.data.eval_name = "reside_sots/indoor"
  config.data.eval_split = "test"
  # The RESIDE root holding ITS/ and SOTS/ (only read when building the TFDS datasets).
  config.data.manual_dir = "~/data/RESIDE"
  # The authors train without augmentation.
  config.data.random_flip = False
  # Decoding PNGs of 620x460 images keeps a GPU waiting without worker processes.
  config.data.worker_count = 4
  return config
