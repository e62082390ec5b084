"""A stable MI-Net: the released model with IM-blocks that are really solved.

    python train.py --config configs/stable.py --workdir workdirs/stable
    python benchmarks/stable_minet.py --stable workdirs/stable

Self-distillation, no download beyond the authors' checkpoint (`init_from="its"`
fetches it once; a converted folder or the .pth works offline): the student starts as
the released model with each IM-block's f scaled by 0.3 (`init_block_scale`; f ends
in a ReLU, so this scales f and its Jacobian eta * df/dg, and the released blocks,
whose Picard maps are no contractions (rho 3.08 / 1.18 / 1.13 on SOTS 1400_1), become
contractions), then trains to reproduce the frozen released model's output (the
teacher: `init_from` as loaded, T = 8 unrolled) on the hazy images of the offline
synthetic set, with every block solved by Picard iteration to rtol 1e-3 and
differentiated by a phantom gradient (one step at the solution). A hinge on each
block's spectral-radius estimate at its solution keeps rho(eta J) below 0.9. Any ITS
folder can replace the synthetic images (``--config.data.name=reside_its
--config.data.manual_dir=...``); the SOTS images, the test set, are never used.

The stored solver is Picard to rtol 1e-3 (at most 30 steps): `dehaze`, `evaluate`,
`stability` and `minet_jax.apply` run the trained model that way unless told
otherwise.

Expected result (measured, docs/STABILITY.md "A stable MI-Net: what was tried"): 500
steps in 8.5 minutes (510 s) on a 2-core x86-64 CPU; synthetic validation PSNR 19.31 dB
(8 images). On the 10 SOTS samples at full resolution the blocks solve in 4 / 7 / ~11
Picard steps, but the model scores about 23.2 dB (the released model: 36.30 dB), and
block 3 is no contraction at its rtol-1e-3 answer on 9 of the 10 images. Its radius
grows with the image: the penalty holds it below 0.9 on the 128 px training crops, and
it reaches 1.23 on full-size ones. This recipe does not yet give a usable stable MI-Net:
the 0.3 scaling moves every fixed point far from the released outputs (untrained: 24.0
/ 22.0 dB on SOTS 1400_1 / 1403_8), and distilling on crops or on four full-size ITS
samples does not bring full-size test images back.
"""

from __future__ import annotations

from minet_jax.train import defaults


def get_config():
  config = defaults.get_config()
  # The released architecture (default's model section), solved instead of unrolled:
  # Picard to rtol 1e-3, at most 30 map evaluations per block; a block that misses the
  # tolerance answers with its iterate of lowest residual.
  config.model.solver = "picard"
  config.model.rtol = 1e-3
  config.model.iterations = (30, 30, 30)
  config.model.best_so_far = True
  # Gradients: one differentiated Picard step at the solution (Jacobian-free
  # backprop), the cheapest adjoint; the blocks are contractions, which it needs.
  config.model.backward = "phantom"
  config.model.phantom_steps = 1
  config.model.phantom_damping = 1.0
  # Theorem 1 as a penalty: max(0, rho - 0.9)^2 per block, rho estimated at the
  # block's solution by 8 power-iteration steps (jvps) started from the solve's last
  # residual; zero while rho < 0.9. (On a full-size ITS image, 4 steps from random
  # noise read the scaled block 3's eigenvalue of 1.37 as 0.56.)
  config.model.contractive_weight = 1.0
  config.model.contractive_kind = "radius"
  config.model.contractive_point = "solution"
  config.model.contractive_target = 0.9
  config.model.contractive_iters = 8
  # Start from the released weights ("its": fetched once and cached, or pass a converted
  # folder or the .pth), each block's f scaled by 0.3, and learn their outputs.
  config.init_from = "its"
  config.init_block_scale = (0.3, 0.3, 0.3)
  config.teacher = "init_from"
  # Random 128 px crops of the synthetic set's 144x192 hazy images (flipped at random),
  # two per step; the teacher sees the same crops.
  config.data.crop_size = 128
  config.data.batch_size = 2
  config.data.eval_batch_size = 4
  config.data.num_eval_images = 8
  config.loss = "mse"
  # Adam from 2e-4, cosine-decayed to 10 %: the released weights need small steps.
  config.optimizer.learning_rate = 2e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.decay_steps = 500
  config.optimizer.cosine_final_fraction = 0.1
  config.num_train_steps = 500
  config.log_every = 10
  config.eval_every = 125
  config.checkpoint_every = 125
  config.grid_images = 2
  return config
