"""grain input pipeline: shuffled, cropped, flipped, batched hazy/clear pairs.

`train_dataset` turns any random-access source of examples (a `PairSource`
from `minet_jax.data.builders.load_source`, or a list of dicts) into a
`grain.MapDataset` of batches ``{"hazy", "clear"}``: float32 RGB in [0, 1],
NHWC. Element ``i`` of that dataset is a pure function of the source, the
arguments and ``i`` (grain's index shuffle is reseeded per epoch, and the crop
and flip of element ``i`` use a generator seeded from ``(seed, i)``), so:

* the same seed gives the same batches, whatever the number of threads or
  worker processes;
* the iterator state is small JSON (in-process, just the index of the next
  batch, ``{"next_index": k}``; with worker processes, one such index per
  worker): `iterator_state` / `restore_iterator` save and restore it, and a
  resumed run continues with exactly the batches an uninterrupted run would
  have produced.

``crop_size=None`` keeps full images (the paper trains on whole 620x460 ITS
images); a batch of full images must then hold images of one size, which is
checked with a clear error.
"""

from __future__ import annotations

import json
import signal
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from minet_jax.core.api import INTEGER_SCALE
from minet_jax.image_io import centre_crop

PAIR_FIELDS = ("hazy", "clear")


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = (int(s) for s in size)
  return h, w


class CropFlip(grain.transforms.RandomMap):
  """The same random crop (and, with probability 1/2, horizontal flip) of hazy and clear."""

  def __init__(self, crop_size: int | Sequence[int] | None, flip: bool):
    self.crop = None if crop_size is None else _hw(crop_size)
    self.flip = flip
    if self.crop is not None and min(self.crop) < 1:
      raise ValueError(f"crop_size must be positive, got {crop_size}")

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
    hazy, clear = np.asarray(element["hazy"]), np.asarray(element["clear"])
    if hazy.shape != clear.shape:
      raise ValueError(f"hazy {hazy.shape} and clear {clear.shape} differ in shape "
                       f"(example {element.get('key', '?')!r})")
    if self.crop is not None:
      (h, w), (ch, cw) = hazy.shape[:2], self.crop
      if ch > h or cw > w:
        raise ValueError(f"crop_size {ch}x{cw} is larger than the {h}x{w} image "
                         f"{element.get('key', '?')!r}; use a smaller crop_size")
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      hazy = hazy[top:top + ch, left:left + cw]
      clear = clear[top:top + ch, left:left + cw]
    if self.flip and rng.random() < 0.5:
      hazy, clear = hazy[:, ::-1], clear[:, ::-1]
    return {"hazy": hazy, "clear": clear}


class CentreCrop(grain.transforms.Map):
  """The central crop of hazy and clear (or the whole images when crop_size is None)."""

  def __init__(self, crop_size: int | Sequence[int] | None):
    self.crop = None if crop_size is None else _hw(crop_size)

  def map(self, element: Mapping[str, Any]) -> dict:
    hazy, clear = np.asarray(element["hazy"]), np.asarray(element["clear"])
    if self.crop is not None:
      (h, w), (ch, cw) = hazy.shape[:2], self.crop
      if ch > h or cw > w:
        raise ValueError(f"crop_size {ch}x{cw} is larger than the {h}x{w} image "
                         f"{element.get('key', '?')!r}; use a smaller crop_size")
      hazy, clear = centre_crop(hazy, ch, cw), centre_crop(clear, ch, cw)
    return {"hazy": hazy, "clear": clear}


def stack_batch(elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks pairs into float32 [0, 1] NHWC arrays (uint8 and uint16 scaled by their
  range, floats taken as [0, 1]); sizes must agree."""
  shapes = {np.shape(e["hazy"]) for e in elements}
  if len(shapes) > 1:
    raise ValueError(
        f"cannot batch images of different sizes {sorted(shapes)} at full size; "
        "set crop_size, or use batch_size=1")
  batch = {}
  for field in PAIR_FIELDS:
    stacked = np.stack([np.asarray(e[field]) for e in elements])
    scale = INTEGER_SCALE.get(stacked.dtype)
    if scale is None and not np.issubdtype(stacked.dtype, np.floating):
      raise ValueError(f"cannot batch {field} images of dtype {stacked.dtype}: uint8, "
                       "uint16 or float in [0, 1] are taken")
    batch[field] = stacked.astype(np.float32) / np.float32(scale or 1)
  return batch


def train_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int,
                  crop_size: int | Sequence[int] | None = None, flip: bool = True,
                  seed: int = 0, num_epochs: int | None = None, shard_index: int = 0,
                  shard_count: int = 1, drop_remainder: bool = True) -> grain.MapDataset:
  """Shuffled, augmented, batched training pairs.

  Args:
    source: random-access examples with uint8 (or float [0, 1]) ``hazy`` and
      ``clear`` HxWx3 arrays.
    batch_size: examples per batch (per process when sharded).
    crop_size: random crop, an int or (height, width); None keeps full images.
    flip: random horizontal flips.
    seed: determines the order, crops and flips.
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this process's share of every global batch of
      ``batch_size * shard_count`` examples (multi-host data parallelism); with a
      finite `num_epochs` the last ``len % shard_count`` examples are left out, so
      every process gets as many batches.
    drop_remainder: drop a last incomplete batch (finite `num_epochs` only).

  Returns:
    A `grain.MapDataset` whose element k is batch k: {"hazy", "clear"} float32
    NHWC in [0, 1].
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if len(source) == 0:
    raise ValueError("the source is empty")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  # Seeded by (seed + 1, index) so crops do not correlate with the shuffle stream.
  ds = ds.random_map(CropFlip(crop_size, flip), seed=(seed + 1) % 2**32)
  if shard_count > 1:
    if num_epochs is not None:  # Every process the same number of batches: lockstep.
      ds = ds[:len(ds) - len(ds) % shard_count]
    ds = ds[shard_index::shard_count]
  return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack_batch)


def eval_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int = 1,
                 crop_size: int | Sequence[int] | None = None,
                 limit: int | None = None) -> grain.MapDataset:
  """Every example once, in source order, centre-cropped (or whole) and batched."""
  ds = grain.MapDataset.source(source)
  if limit is not None:
    ds = ds[:limit]
  ds = ds.map(CentreCrop(crop_size))
  return ds.batch(batch_size, drop_remainder=False, batch_fn=stack_batch)


def make_iterator(dataset: grain.MapDataset, *, num_threads: int = 2,
                  prefetch: int = 4, worker_count: int = 0) -> grain.DatasetIterator:
  """An iterator over `dataset` with `get_state()` / `set_state()`.

  Args:
    dataset: e.g. from `train_dataset`.
    num_threads: threads reading and augmenting (decoding PNG releases the GIL).
    prefetch: elements buffered ahead by those threads.
    worker_count: > 0 runs the pipeline in that many processes (the source
      must be picklable, as `PairSource` is); call ``iterator.close()`` when
      done so the workers shut down before the interpreter does.
  """
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
  if worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app nobody parses them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                        worker_init_fn=_ignore_interrupts)
  return iter(ds)


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
  """Run in each worker process: a terminal's Ctrl-C reaches the whole process group, and
  the workers must outlive it for their parent to finish its step and save (they stop
  when it closes them)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
  """The iterator's position as JSON bytes (store it with each checkpoint)."""
  return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def saved_worker_count(state: Mapping) -> int | None:
  """The ``worker_count`` of the iterator whose position `state` is (None: unknown):
  in the training process a read position, with workers one state per worker."""
  if "next_index" in state:
    return 0
  per_worker = state.get("iterators_in_use_states")
  return len(per_worker) if isinstance(per_worker, list) else None


def restore_iterator(iterator: grain.DatasetIterator, state: bytes | str | Mapping,
                     worker_count: int | None = None) -> None:
  """Moves `iterator` to a position saved by `iterator_state`.

  With ``worker_count`` (the iterator's, as given to `make_iterator`), a position saved
  with another number of workers is a ValueError: grain would take it, then read
  another sequence or fail later.
  """
  if isinstance(state, (bytes, str)):
    state = json.loads(state)
  saved = saved_worker_count(state)
  if worker_count is not None and saved is not None and saved != worker_count:
    raise ValueError(f"the position was saved with {saved} data worker process(es), "
                     f"this iterator has {worker_count}")
  iterator.set_state(dict(state))
