"""Scores MI-Net, the hazy input and the dark channel prior on paired images.

    python evaluate.py --ckpt checkpoints/minet_its --data path/to/SOTS/indoor
    python evaluate.py --ckpt checkpoints/minet_its --data reside_sots/indoor --split test

Prints ``method | PSNR | SSIM | s/image``, and for a model whose IM-blocks are solved
to a tolerance (a stable model, or ``--solver``) how many solves converged and the mean
steps per block, naming each image whose solves missed the tolerance; ``--out DIR`` adds
per_image.csv and results.json (with each image's steps, convergence and residuals),
``--save-images DIR`` the outputs as PNG. Exits with 1 when any
image failed (the others are still scored). The command line is
`minet_jax.evaluation.main` (also installed as ``minet-evaluate``).
"""

import sys

from minet_jax.evaluation import main

if __name__ == "__main__":
  sys.exit(main())
