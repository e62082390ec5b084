"""grain pipeline: determinism, resume continuity, crops, flips, batching."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from minet_jax.data import builders
from minet_jax.data import pipeline
from minet_jax.data import synthetic


def _source(n: int = 7, shape=(20, 24)) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    hazy = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out.append({"hazy": hazy, "clear": 255 - hazy, "key": f"ex{i}"})
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for field in ("hazy", "clear"):
      np.testing.assert_array_equal(a[field], b[field])


def test_deterministic_for_a_seed():
  source = _source()
  make = lambda seed, threads: pipeline.make_iterator(
      pipeline.train_dataset(source, batch_size=3, crop_size=8, seed=seed),
      num_threads=threads)
  first = _take(make(0, 1), 6)
  _assert_same(first, _take(make(0, 3), 6))  # threads do not change the sequence
  other = _take(make(1, 1), 6)
  assert any(not np.array_equal(a["hazy"], b["hazy"]) for a, b in zip(first, other))


def test_resume_continues_the_sequence():
  source = _source(5)
  ds = pipeline.train_dataset(source, batch_size=2, crop_size=(8, 10), seed=7)
  reference = _take(pipeline.make_iterator(ds), 9)  # crosses several epochs
  it = pipeline.make_iterator(ds)
  _take(it, 4)
  state = pipeline.iterator_state(it)
  assert isinstance(state, bytes)
  resumed = pipeline.make_iterator(pipeline.train_dataset(source, batch_size=2,
                                                          crop_size=(8, 10), seed=7))
  pipeline.restore_iterator(resumed, state)
  _assert_same(_take(resumed, 5), reference[4:])


def test_a_position_resumes_only_with_the_worker_count_it_was_saved_with():
  """grain took a position saved with 2 worker processes into 3 (one wrong batch, then an
  IndexError) or 1 (an IndexError): another count is now a ValueError before anything
  is read, and the same count continues the sequence."""
  source = _source(5)
  ds = pipeline.train_dataset(source, batch_size=1, crop_size=(8, 10), seed=7)
  it = pipeline.make_iterator(ds, worker_count=2)
  try:
    _take(it, 3)
    state = pipeline.iterator_state(it)
    want = _take(it, 2)
  finally:
    it.close()
  for count in (3, 1, 0):
    other = pipeline.make_iterator(ds, worker_count=count)
    try:
      with pytest.raises(ValueError, match=f"saved with 2 data worker process.es., this "
                                           f"iterator has {count}"):
        pipeline.restore_iterator(other, state, worker_count=count)
    finally:
      if count:
        other.close()
  same = pipeline.make_iterator(ds, worker_count=2)
  try:
    pipeline.restore_iterator(same, state, worker_count=2)
    _assert_same(_take(same, 2), want)
  finally:
    same.close()


def _find_window(image: np.ndarray, window: np.ndarray) -> list[tuple[int, int, bool]]:
  """All (top, left, flipped) placements of `window` in `image` (brute force)."""
  h, w = window.shape[:2]
  hits = []
  for top in range(image.shape[0] - h + 1):
    for left in range(image.shape[1] - w + 1):
      patch = image[top:top + h, left:left + w]
      for flipped, candidate in ((False, patch), (True, patch[:, ::-1])):
        if np.array_equal(candidate, window):
          hits.append((top, left, flipped))
  return hits


def test_crops_and_flips():
  source = _source(4)
  ds = pipeline.train_dataset(source, batch_size=2, crop_size=(8, 10), seed=0)
  flips, positions = set(), set()
  for batch in _take(pipeline.make_iterator(ds), 12):
    assert batch["hazy"].shape == batch["clear"].shape == (2, 8, 10, 3)
    assert batch["hazy"].dtype == np.float32
    assert 0 <= batch["hazy"].min() and batch["hazy"].max() <= 1
    np.testing.assert_allclose(batch["clear"], 1 - batch["hazy"], atol=1e-6)  # same window
    for hazy in batch["hazy"]:
      window = np.round(hazy * 255).astype(np.uint8)
      hits = [h for ex in source for h in _find_window(ex["hazy"], window)]
      assert len(hits) == 1
      positions.add(hits[0][:2])
      flips.add(hits[0][2])
  assert flips == {False, True} and len(positions) > 5
  no_flip = pipeline.train_dataset(source, batch_size=4, crop_size=None, flip=False, seed=0)
  batch = no_flip[0]
  originals = {ex["hazy"].tobytes() for ex in source}
  assert {np.round(x * 255).astype(np.uint8).tobytes() for x in batch["hazy"]} == originals


def test_epochs_are_permutations():
  source = [{"hazy": np.full((2, 2, 3), i, np.uint8), "clear": np.zeros((2, 2, 3), np.uint8)}
            for i in range(6)]
  ds = pipeline.train_dataset(source, batch_size=1, flip=False, seed=3, num_epochs=2)
  order = [int(round(b["hazy"][0, 0, 0, 0] * 255)) for b in pipeline.make_iterator(ds)]
  assert len(order) == 12
  assert sorted(order[:6]) == sorted(order[6:]) == list(range(6))
  assert order[:6] != order[6:]  # reshuffled each epoch


def test_full_images_need_one_size():
  mixed = _source(2, (10, 12)) + _source(2, (12, 10))
  ds = pipeline.train_dataset(mixed, batch_size=4, crop_size=None, seed=0)
  with pytest.raises(ValueError, match="different sizes"):
    _take(pipeline.make_iterator(ds), 1)
  ones = pipeline.train_dataset(mixed, batch_size=1, crop_size=None, seed=0)
  shapes = {b["hazy"].shape for b in _take(pipeline.make_iterator(ones), 4)}
  assert shapes == {(1, 10, 12, 3), (1, 12, 10, 3)}
  with pytest.raises(ValueError, match="larger than"):
    pipeline.train_dataset(mixed, batch_size=1, crop_size=11, seed=0)[0]


def test_shards_split_each_global_batch():
  source = _source(9)
  whole = pipeline.train_dataset(source, batch_size=4, crop_size=6, seed=2)
  parts = [pipeline.train_dataset(source, batch_size=2, crop_size=6, seed=2, shard_index=p,
                                  shard_count=2) for p in range(2)]
  for k in range(5):
    glued = np.concatenate([parts[0][k]["hazy"], parts[1][k]["hazy"]])
    assert sorted(x.tobytes() for x in glued) == sorted(x.tobytes() for x in whole[k]["hazy"])
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.train_dataset(source, batch_size=2, shard_index=2, shard_count=2)
  # A finite epoch gives every process as many batches (lockstep), with or without the
  # last incomplete one: 10 examples over 3 processes in batches of 2.
  for drop in (True, False):
    lengths = {len(pipeline.train_dataset(_source(10), batch_size=2, crop_size=6, num_epochs=1,
                                          shard_index=p, shard_count=3, drop_remainder=drop))
               for p in range(3)}
    assert lengths == {1 if drop else 2}


def test_eval_dataset_in_order():
  source = _source(3)
  batches = list(pipeline.eval_dataset(source, batch_size=2, crop_size=(10, 12)))
  assert [b["hazy"].shape[0] for b in batches] == [2, 1]
  np.testing.assert_array_equal(np.round(batches[0]["hazy"][1] * 255).astype(np.uint8),
                                source[1]["hazy"][5:15, 6:18])


def test_with_a_built_source(tmp_path):
  cfg = synthetic.SyntheticHazeConfig(image_size=(20, 24), train_rooms=2, validation_rooms=0,
                                      motorcycle_views=0, hazes_per_scene=2)
  source = builders.load_source("synthetic_haze", "train", tmp_path, synthetic_config=cfg)
  clone = pickle.loads(pickle.dumps(source))  # what grain worker processes receive
  assert clone[1]["key"] == source[1]["key"]
  ds = pipeline.train_dataset(clone, batch_size=2, crop_size=16, seed=0)
  batch = next(pipeline.make_iterator(ds))
  assert batch["hazy"].shape == (2, 16, 16, 3) and set(batch) == {"hazy", "clear"}
