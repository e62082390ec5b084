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
  # Stop when rms(T(g) - g) <= atol + rtol * rms(T(g)) ("picard"/"anderson"; "unrolled" only
  # reports whether its last step meets it, as each block's status).
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


def get_data_config() -> ml_collections.ConfigDict:
  """What to train and validate on, and how batches are cut (minet_jax.data)."""
  data = ml_collections.ConfigDict()
  # Training dataset: "synthetic_haze" (embedded, built offline), "reside_its",
  # "reside_sots/indoor", "reside_sots/outdoor" or "paired_folder/<name>".
  data.name = "synthetic_haze"
  # Split (TFDS slicing allowed, e.g. "train[:90%]") to train on.
  data.train_split = "train"
  # Validation dataset; "" means the training dataset.
  data.eval_name = ""
  # Validation split (synthetic_haze: "validation"; reside_sots: "test").
  data.eval_split = "validation"
  # Where built TFDS datasets live ("" = TFDS's default, ~/tensorflow_datasets).
  data.data_dir = ""
  # Source folder of the training set (RESIDE / paired folders; only to build it once).
  data.manual_dir = ""
  # Source folder of the validation set, if it differs ("" = data.manual_dir).
  data.eval_manual_dir = ""
  # Side of the random square training crops; 0 trains on full images (as the paper does).
  data.crop_size = 0
  # Random horizontal flips of training pairs.
  data.random_flip = True
  # Global batch size (split over all devices; must be divisible by their number).
  data.batch_size = 8
  # Validation images per forward pass (padded up to a multiple of the device count).
  data.eval_batch_size = 4
  # Validate on the first N images of the split only (0 = all of them).
  data.num_eval_images = 0
  # grain worker processes for decoding/augmenting (0 = in the training process).
  data.worker_count = 0
  # The synthetic_haze set to build (minet_jax.data.synthetic.SyntheticHazeConfig).
  data.synthetic = ml_collections.ConfigDict()
  # (height, width) of every synthetic image.
  data.synthetic.image_size = (144, 192)
  # Rendered rooms in the synthetic train split.
  data.synthetic.train_rooms = 48
  # Rendered rooms in the synthetic validation split (no scene shared with train).
  data.synthetic.validation_rooms = 8
  # Crops of the Middlebury motorcycle added to the synthetic train split.
  data.synthetic.motorcycle_views = 4
  # Hazy renderings of each clear image (RESIDE ITS uses 10).
  data.synthetic.hazes_per_scene = 3
  # Seed of the synthetic set (its content, not the training order).
  data.synthetic.seed = 0
  return data


def get_optimizer_config() -> ml_collections.ConfigDict:
  """Adam and its learning-rate schedule (minet_jax.train.state.make_optimizer)."""
  optimizer = ml_collections.ConfigDict()
  # Optimizer; "adam" is the one the paper and the authors' code use.
  optimizer.name = "adam"
  # Peak learning rate.
  optimizer.learning_rate = 1e-3
  # "constant", "step" (x decay_factor every decay_steps) or "cosine" (to
  # learning_rate * cosine_final_fraction at decay_steps).
  optimizer.schedule = "step"
  # Steps between decays ("step") or length of the decay ("cosine").
  optimizer.decay_steps = 20_000
  # Multiplier applied every decay_steps by the "step" schedule.
  optimizer.decay_factor = 0.1
  # Final learning rate of the "cosine" schedule, as a fraction of learning_rate.
  optimizer.cosine_final_fraction = 0.0
  # Linear warm-up from 0 over this many steps (0 = none).
  optimizer.warmup_steps = 0
  # Adam's beta1, beta2 and epsilon (PyTorch's and optax's defaults).
  optimizer.b1 = 0.9
  optimizer.b2 = 0.999
  optimizer.eps = 1e-8
  # Clip gradients to this global norm before Adam (0 = no clipping).
  optimizer.grad_clip_norm = 0.0
  return optimizer


def get_config() -> ml_collections.ConfigDict:
  """Base config: the released architecture and the paper's training recipe."""
  config = ml_collections.ConfigDict()
  # Architecture (minet_jax.ModelConfig).
  config.model = get_model_config()
  # Seed for parameter initialisation (and, in training, data order and augmentation).
  config.seed = 0
  # Training and validation data.
  config.data = get_data_config()
  # Optimizer and learning-rate schedule.
  config.optimizer = get_optimizer_config()
  # Training loss: "mse" or "l1" on RGB in [0, 1], or "l2", the authors' loss (unsquared
  # norm of the whole batch's error on 0..255 pixel values; configs/its_authors.py).
  config.loss = "mse"
  # Optimizer steps to train for (the paper: 350k).
  config.num_train_steps = 350_000
  # Steps between training-metric log lines (metrics.jsonl, TensorBoard).
  config.log_every = 100
  # Steps between validations (PSNR/SSIM, image grid, best checkpoint); 0 = only at the end.
  config.eval_every = 5_000
  # Steps between resumable checkpoints (one is also written at the end and on SIGTERM).
  config.checkpoint_every = 5_000
  # Resumable checkpoints to keep (the best-PSNR one is kept separately).
  config.keep_checkpoints = 2
  # Validation images shown in the before/after grid PNG (0 = no grid).
  config.grid_images = 4
  # Init of the tail's RGB -> RGB 1x1 convs when starting from scratch: "kaiming" (the
  # authors' random init) or "identity" (pass the input colours through at first).
  config.init_tail = "kaiming"
  # Start from these weights (a minet_jax.save / convert folder or a training workdir);
  # "" starts from a random init. Ignored when the workdir already holds a checkpoint.
  config.init_from = ""
  # Call jax.distributed.initialize() first (multi-host jobs; settings from the environment).
  config.distributed = False
  # Write checkpoints in a background thread while training goes on.
  config.async_checkpointing = True
  return config
