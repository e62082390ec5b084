"""The training data, as the config names it: sources, the train iterator and its state.

The data modules (TFDS builders, the grain pipeline, the synthetic set) are
imported on first use, so importing the training package stays light.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from minet_jax.train import sharding

if TYPE_CHECKING:
  from minet_jax.data.synthetic import SyntheticHazeConfig


def synthetic_config(data: ml_collections.ConfigDict) -> SyntheticHazeConfig:
  """The `SyntheticHazeConfig` of ``config.data.synthetic``."""
  from minet_jax.data.synthetic import SyntheticHazeConfig  # Deferred: renders with skimage.

  # The record turns list-valued fields (from JSON or the command line) into tuples.
  return SyntheticHazeConfig(**data.synthetic.to_dict())


def sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(train, validation) random-access sources; builds the TFDS datasets if needed.

  In a multi-process job process 0 builds (or opens) them first and the others wait:
  two builds of one dataset folder at once would collide.
  """
  loaded = _load_sources(config) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("minet_jax: training data ready")
  return loaded or _load_sources(config)


def _load_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  from minet_jax.data import builders

  data = config.data
  data_dir = data.data_dir or None
  manual_dir = data.manual_dir or None
  synthetic = synthetic_config(data)
  train = builders.load_source(data.name, data.train_split, data_dir, manual_dir,
                               synthetic_config=synthetic)
  eval_name = data.eval_name or data.name
  # A RESIDE root holds ITS and SOTS alike, so the training folder is the default.
  eval_manual = data.eval_manual_dir or manual_dir
  validation = builders.load_source(eval_name, data.eval_split, data_dir, eval_manual,
                                    synthetic_config=synthetic)
  return train, validation


def train_iterator(config: ml_collections.ConfigDict, source, mesh) -> Any:
  """This host's shard of shuffled, cropped, flipped training batches (resumable)."""
  from minet_jax.data import pipeline

  data = config.data
  local_batch = sharding.per_host_batch_size(int(data.batch_size), mesh)
  dataset = pipeline.train_dataset(
      source, batch_size=local_batch, crop_size=int(data.crop_size) or None,
      flip=bool(data.random_flip), seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  return pipeline.make_iterator(dataset, worker_count=int(data.worker_count))


def iterator_state(iterator) -> dict:
  """The iterator's position, as a checkpoint stores it."""
  from minet_jax.data import pipeline
  return json.loads(pipeline.iterator_state(iterator))


def restore_iterator(iterator, state: dict, worker_count: int | None = None) -> None:
  """Moves the iterator to a position `iterator_state` returned (ValueError when it was
  saved with another ``worker_count``)."""
  from minet_jax.data import pipeline
  pipeline.restore_iterator(iterator, state, worker_count)
