"""A tiny run for tests: a narrow, shallow MI-Net on a few 32 px synthetic crops.

Compiles and trains in seconds on a CPU; it exercises every part of training
(checkpoints, resume, validation, logging) and learns nothing worth keeping.
"""

from __future__ import annotations

from minet_jax.train import defaults


def get_config():
  config = defaults.get_config()
  # Narrow features and two iterations per IM-block: a fast compile and step.
  config.model.features = 8
  config.model.iterations = (2, 2, 2)
  # One encoder residual block instead of three.
  config.model.pre_blocks = 1
  # No smoothing kernels before the dilated convs: on XLA:CPU they triple the compile
  # time of this tiny step (about 34 s vs 11 s), and the tests are about training.
  config.model.smoothed_dilation = False
  # Inputs in [0, 1]; the released BGR 0..255 convention only matters for its weights.
  config.model.input_format = "rgb01"
  # A handful of small synthetic images (64x64; 8 training and 2 validation pairs).
  config.data.synthetic.image_size = (64, 64)
  config.data.synthetic.train_rooms = 2
  config.data.synthetic.validation_rooms = 1
  config.data.synthetic.motorcycle_views = 2
  config.data.synthetic.hazes_per_scene = 2
  # 32 px crops, two per batch.
  config.data.crop_size = 32
  config.data.batch_size = 2
  config.data.eval_batch_size = 2
  # A constant rate: a stopped-and-resumed run sees exactly the rates of a straight one.
  config.optimizer.schedule = "constant"
  # A few steps, logging, validating and checkpointing often.
  config.num_train_steps = 4
  config.log_every = 1
  config.eval_every = 2
  config.checkpoint_every = 2
  config.keep_checkpoints = 3
  config.grid_images = 2
  # Synchronous saves keep the tests' view of the disk simple.
  config.async_checkpointing = False
  return config
