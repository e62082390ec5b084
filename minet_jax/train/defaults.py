"""The base training config: the authors' released MI-Net architecture and the paper's
recipe, every field documented where it is set.

Each config file (``configs/*.py``) starts from `get_config` and overrides fields::

    from minet_jax.train import defaults

    def get_config():
      config = defaults.get_config()
      config.num_train_steps = 2000
      return config

The `model` section is derived from `minet_jax.ModelConfig` and `data.synthetic` from
`minet_jax.data.synthetic.SyntheticHazeConfig`: those records define the fields,
their defaults and their documentation once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from minet_jax.core.config import ModelConfig
from minet_jax.data.synthetic import SyntheticHazeConfig


def section(record: Any) -> ml_collections.ConfigDict:
  """A frozen dataclass record as a config section, field for field.

  The record's class is the one definition of the fields, their defaults and their
  meaning (documented where the class is); a section built here cannot drift from it.
  Tuples stay tuples so ``--config.model.iterations=(4,4,4)`` type-checks; an optional
  field whose default is None takes its type on the command line
  (``--config.data.synthetic.depth_scale_m=5.0``), and a field of several types takes
  any of them (``--config.model.unroll=1`` or ``=auto``).
  """
  hints = typing.get_type_hints(type(record))
  fields = {}
  for field in dataclasses.fields(record):
    value, hint = getattr(record, field.name), hints[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
      kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
      if value is None and len(kinds) == 1:
        value = config_dict.placeholder(kinds[0])
      elif len(kinds) > 1:
        if isinstance(value, tuple) and value and len(set(value)) == 1:
          # One number per block, all equal (`ModelConfig`'s normalised form): as one
          # number it stays valid when --config.model.dilations changes the block count.
          value = value[0]
        value = ml_collections.FieldReference(value, field_type=object)
    fields[field.name] = value
  return ml_collections.ConfigDict(fields)


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
  # The synthetic_haze set to build: SyntheticHazeConfig's fields and defaults
  # (minet_jax/data/synthetic/__init__.py documents them; every field changes the data).
  data.synthetic = section(SyntheticHazeConfig())
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
  # Linear warm-up from 0 over this many steps (0 = none); decay_steps count from its end.
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
  # Architecture: minet_jax.ModelConfig's fields and defaults (the released checkpoint's);
  # minet_jax/core/config.py says what each field means.
  config.model = section(ModelConfig())
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
  # Start from these weights (a minet_jax.save / convert folder, a training workdir, an
  # authors' .pth file, or "its" for the released weights, fetched once and cached:
  # minet_jax.hub); "" starts from a random init. Ignored when the workdir already
  # holds a checkpoint.
  config.init_from = ""
  # With init_from a training workdir: the config file (a path, as --config takes it) of
  # the run that trains it. A fresh start first runs that config there, or resumes it,
  # unless that run has reached its last step: one command trains a recipe of several
  # runs (configs/stable_fullres.py). "" = init_from is trained already.
  config.init_from_config = ""
  # With init_from: one entry per IM-block, "" or a model (as init_from names one) whose
  # weights of that block replace init_from's, e.g. ("", "its", "") to train block 2
  # again from the released block (minet_jax.train.state.replace_blocks;
  # configs/stable_fullres.py); () = none.
  config.init_blocks_from = ()
  # With init_from: scale each IM-block's f by these factors (one per block; () = no
  # change) before training (minet_jax.train.state.shrink_blocks; configs/stable.py).
  config.init_block_scale = ()
  # Self-distillation: train towards this model's outputs on the hazy inputs instead of
  # the ground truth: a checkpoint folder, or "init_from" for the init_from weights as
  # loaded (before init_block_scale). "" trains on the ground truth.
  config.teacher = ""
  # With a teacher: weight of the block fixed-point matching term, which trains each
  # IM-block's f so that the teacher's block output is its fixed point given the
  # teacher's block input (minet_jax.stability.contractive.fixed_point_mismatch; no solve
  # needed but a two-stage block's first stage).
  config.teacher_match_weight = 0.0
  # Picard steps of that term, warm-started at the teacher's stage, the last one
  # differentiated: 1 matches the one-step residual; more weigh the error of the block's
  # own answer, which the residual underestimates where the block's Jacobian is near 1.
  config.teacher_match_steps = 1
  # Whose block inputs that term (and the penalty at the solutions) takes: "teacher"
  # (block-wise distillation: every block learns from the teacher's states) or
  # "student" (the model's own solved blocks give each block its input, so a block
  # learns to bring the states the model's earlier blocks give it back to the teacher's
  # block output; one more forward solve per step).
  config.teacher_inputs = "teacher"
  # Train only these IM-blocks' f (block numbers from 1; () trains the whole model; needs
  # init_from): the other parameters stay exactly as at the start (init_from, after
  # init_block_scale), and the teacher matching and the contractive penalty skip the
  # other blocks. With the block-wise distillation of configs/stable.py (and no
  # optimizer.grad_clip_norm, which would couple the blocks) each block trains on its
  # own, so a change to one block's settings needs only that block trained
  # (benchmarks/stable_compose.py puts the blocks of several runs together).
  config.train_blocks = ()
  # Weight of the loss on the model's output (config.loss); 0 skips the forward pass
  # (with a teacher and teacher_match_weight > 0: train the blocks alone, cheaply).
  config.output_weight = 1.0
  # Call jax.distributed.initialize() first (multi-host jobs; settings from the environment).
  config.distributed = False
  # Write checkpoints in a background thread while training goes on.
  config.async_checkpointing = True
  # On a CPU, what XLA hands to YNNPACK when it compiles the training step: "default"
  # (XLA's choice: most matrix products and convolutions, and elementwise and reduction
  # fusions) or a comma-separated list of dot, eltwise, reduce, convolution. "dot" runs
  # the convolutions and their gradients in XLA's own kernels: on an idle CPU it takes
  # 26-40% off the released architecture's step, but a run sharing its cores with other
  # work was slower, and the quickstart scored 0.1-0.2 dB lower on average over four
  # pairs of runs (docs/TRAINING.md). Other programs (validation) keep XLA's choice;
  # ignored off the CPU.
  config.xla_cpu_ynn_fusions = "default"
  return config
