"""Base configuration: the authors' released MI-Net architecture.

Every other config imports this one and overrides fields. The `model` section is
`minet_jax.ModelConfig` field for field (a test keeps them in sync).

    python train.py --config configs/its.py --workdir workdirs/its
"""

from __future__ import annotations

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """The architecture section; defaults are the released checkpoint's."""
  model = ml_collections.ConfigDict()
  # Width of every feature map between encoder and decoder (released: 64).
  model.features = 64
  # Residual blocks after the stride-2 encoder conv (authors' "pre_processing": 3).
  model.pre_blocks = 3
  # Fixed-point iterations T per IM-block (released code: 8; the paper's text: 12).
  model.iterations = (8, 8, 8)
  # Dilation of each IM-block's first conv (released code: 1/2/4; the paper's text: 1/2/5).
  model.dilations = (1, 2, 4)
  # Implicit Euler step: each block iterates g <- g0 + eta * f(g) (released: 1).
  model.eta = 1.0
  # Shared (2d-1)x(2d-1) smoothing kernels before the convs of blocks with d > 1.
  model.smoothed_dilation = True
  # lax.scan unroll of the iteration: "auto" = full on CPU (jax-ml/jax#12868), 1 elsewhere.
  model.unroll = "auto"
  # IM-block solver (minet_jax.fixed_point): "unrolled" = exactly `iterations` steps (released);
  # "picard"/"anderson" iterate to rtol/atol, at most `iterations` steps.
  model.solver = "unrolled"
  # Stop when rms(T(g) - g) <= atol + rtol * rms(T(g)) ("picard"/"anderson" only).
  model.rtol = 1e-3
  # Absolute tolerance of that test, per element (0: relative only).
  model.atol = 0.0
  # Anderson history length m.
  model.anderson_m = 5
  # Anderson damping beta in (0, 1] (1: undamped).
  model.anderson_beta = 1.0
  # Relative Tikhonov regulariser of Anderson's m x m least squares.
  model.anderson_reg = 1e-5
  # IM-block gradients: "backprop" (through the iterations) or "implicit" (flat memory).
  model.backward = "backprop"
  # Step cap of the implicit backward's adjoint solve (0: the block's `iterations`).
  model.adjoint_max_steps = 0
  # Tolerances of the adjoint solve.
  model.adjoint_rtol = 1e-3
  model.adjoint_atol = 0.0
  # Training only (minet_jax.contractive.penalty): weight of the penalty on each block's
  # ||eta * df/dg||_2 estimate above contractive_target (0: off).
  model.contractive_weight = 0.0
  # Spectral-norm level the penalty aims below (< 1: the Picard map contracts).
  model.contractive_target = 0.9
  # Power-iteration steps (jvp + vjp each) of the penalty's norm estimate.
  model.contractive_iters = 4
  # Compute dtype of the convolutions ("float32", "bfloat16", "float16").
  model.dtype = "float32"
  # Conv precision: "highest" (exact float32, PyTorch parity) or "default" (e.g. TF32 on GPUs).
  model.precision = "highest"
  # What the first layer sees: "bgr255" (released weights) or "rgb01".
  model.input_format = "bgr255"
  # Instance-norm epsilon (PyTorch default).
  model.norm_eps = 1e-5
  # LeakyReLU slope in the tail.
  model.leaky_slope = 0.1
  # Kaiming-normal `a` for plain convs (authors: kaiming_normal_(w, 0.1)).
  model.init_kaiming_a = 0.1
  # How odd image sizes are padded to even before the stride-2 encoder ("reflect"/"edge").
  model.pad_mode = "reflect"
  return model


def get_config() -> ml_collections.ConfigDict:
  """Base config (model only here; training configs add their sections)."""
  config = ml_collections.ConfigDict()
  # Architecture (minet_jax.ModelConfig).
  config.model = get_model_config()
  # Seed for parameter initialisation (and, in training, data order and augmentation).
  config.seed = 0
  return config
