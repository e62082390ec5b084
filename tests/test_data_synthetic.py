"""The offline synthetic haze set: physics, depth units, determinism, splits."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from minet_jax.data.synthetic import scenes
from minet_jax import image_io
from minet_jax.data import synthetic

SMALL = synthetic.SyntheticHazeConfig(image_size=(24, 32), train_rooms=3, validation_rooms=2,
                                      motorcycle_views=2, hazes_per_scene=2, seed=3)


@pytest.fixture(scope="module")
def examples():
  return {split: list(synthetic.generate(split, SMALL)) for split in synthetic.SPLITS}


def test_add_haze_closed_form():
  clear = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)
  depth = np.array([[2.0, 4.0]])
  hazy = synthetic.add_haze(clear, depth, beta=1.5, airlight=0.8)
  # d = depth / max(depth) = (0.5, 1.0).
  t = np.exp(-1.5 * np.array([0.5, 1.0]))[None, :, None]
  np.testing.assert_allclose(hazy, clear / 255 * t + 0.8 * (1 - t), rtol=1e-12)
  fixed = synthetic.add_haze(clear, depth, beta=1.5, airlight=0.8, depth_scale_m=10.0)
  t = np.exp(-1.5 * np.array([0.2, 0.4]))[None, :, None]
  np.testing.assert_allclose(fixed, clear / 255 * t + 0.8 * (1 - t), rtol=1e-12)
  with pytest.raises(ValueError, match="depth shape"):
    synthetic.add_haze(clear, depth[:, :1], 1.0, 0.9)
  wide = synthetic.add_haze(clear.astype(np.uint16) * 257, depth, beta=1.5, airlight=0.8)
  np.testing.assert_allclose(wide, hazy, rtol=1e-12)  # uint16 on its own 0..65535 scale
  with pytest.raises(ValueError, match="maximum must be > 0"):  # 0 / 0: every pixel NaN
    synthetic.add_haze(clear, np.zeros_like(depth), 1.0, 0.9)


def test_examples_follow_the_scattering_model(examples):
  for split, exs in examples.items():
    assert len(exs) == SMALL.num_examples(split)
    for ex in exs:
      assert ex["hazy"].shape == ex["clear"].shape == (24, 32, 3)
      assert ex["hazy"].dtype == ex["clear"].dtype == np.uint8
      assert ex["depth"].shape == (24, 32) and ex["depth"].dtype == np.float32
      assert 0.6 <= ex["beta"] <= 1.8 and 0.7 <= ex["airlight"] <= 1.0
      assert 0.5 < ex["depth"].min() and ex["depth"].max() < 10.0  # metres, NYU-like range
      # Invert the model per pixel: t = (I - A) / (J - A) must equal exp(-beta d / d_max)
      # wherever J is far enough from A for 8-bit rounding not to dominate.
      j = ex["clear"] / 255.0
      i = ex["hazy"] / 255.0
      a = float(ex["airlight"])
      t_true = np.exp(-ex["beta"] * ex["depth"] / ex["depth"].max())[..., None]
      keep = np.abs(j - a) > 0.25
      t_est = (i - a) / np.where(keep, j - a, 1.0)
      assert np.abs(t_est - t_true)[keep].max() < 0.5 / 255 / 0.25 + 1e-6
      # Haze lowers contrast: the hazy image is closer to A than the clear one.
      assert np.abs(i - a).mean() < np.abs(j - a).mean()


def test_deterministic_and_seeded(examples):
  again = list(synthetic.generate("validation", SMALL))
  for x, y in zip(again, examples["validation"]):
    for field in ("hazy", "clear", "depth"):
      np.testing.assert_array_equal(x[field], y[field])
    assert (x["key"], x["beta"]) == (y["key"], y["beta"])
  other = next(synthetic.generate("validation", SMALL.__class__(
      **{**SMALL.__dict__, "seed": 4})))
  assert not np.array_equal(other["clear"], examples["validation"][0]["clear"])
  # More hazy renderings per scene keep the scenes and the first renderings.
  more = list(synthetic.generate("validation", SMALL.__class__(
      **{**SMALL.__dict__, "hazes_per_scene": 3})))
  np.testing.assert_array_equal(more[0]["hazy"], examples["validation"][0]["hazy"])
  np.testing.assert_array_equal(more[3]["clear"], examples["validation"][2]["clear"])


def test_splits_share_no_scene(examples):
  train = {ex["scene"] for ex in examples["train"]}
  val = {ex["scene"] for ex in examples["validation"]}
  assert not train & val
  assert "motorcycle" in train and len(val) == SMALL.validation_rooms
  keys = [ex["key"] for exs in examples.values() for ex in exs]
  assert len(set(keys)) == len(keys)
  clears = {ex["clear"].tobytes() for ex in examples["train"]}
  assert not clears & {ex["clear"].tobytes() for ex in examples["validation"]}
  assert not set(scenes.VALIDATION_POSTERS) & set(scenes.TRAIN_POSTERS + scenes.MATERIALS)
  with pytest.raises(ValueError, match="unknown split"):
    list(synthetic.generate("test", SMALL))


def test_config_validation():
  with pytest.raises(ValueError, match="image_size"):
    synthetic.SyntheticHazeConfig(image_size=(8, 8))
  with pytest.raises(ValueError, match="beta_range"):
    synthetic.SyntheticHazeConfig(beta_range=(1.0, 0.5))
  with pytest.raises(ValueError, match="depth_scale_m"):
    synthetic.SyntheticHazeConfig(depth_scale_m=0.0)
  for bad in ((0.5, 2.0), (2.0, 1.5), (1.0, 2.0, 3.0), (1.0, float("inf"))):
    with pytest.raises(ValueError, match="exposure_range must be .low, high. with 1 <= low"):
      synthetic.SyntheticHazeConfig(exposure_range=bad)


def test_exposure_saturates_the_same_scenes(examples):
  """A gain of 2 is the default rendering doubled and clipped, scene for scene; a range
  draws one gain per scene, the geometry and the haze draws unchanged."""
  doubled = SMALL.__class__(**{**SMALL.__dict__, "exposure_range": (2.0, 2.0)})
  for stream, index, name in (("train", 1, "train_room_0001"), ("motorcycle", 0, "motorcycle")):
    rng = np.random.default_rng([SMALL.seed, synthetic._STREAM[stream], index])
    rgb, _ = (scenes.motorcycle(rng, SMALL.image_size) if stream == "motorcycle" else
              scenes.render_room(rng, SMALL.image_size, scenes.TRAIN_POSTERS, SMALL.supersample))
    clear, depth = synthetic.render_scene(stream, index, doubled)
    np.testing.assert_array_equal(clear, image_io.to_uint8(np.clip(2.0 * rgb, 0.0, 1.0)))
    plain = next(ex for ex in examples["train"] if ex["scene"] == name)
    np.testing.assert_array_equal(depth, plain["depth"])
  ranged = SMALL.__class__(**{**SMALL.__dict__, "exposure_range": (1.5, 3.0)})
  gains = {}
  for plain, bright in zip(examples["train"], synthetic.generate("train", ranged)):
    assert (bright["key"], bright["beta"], bright["airlight"]) == (
        plain["key"], plain["beta"], plain["airlight"])
    np.testing.assert_array_equal(bright["depth"], plain["depth"])
    # The gain, read off the pixels the clip left alone, is the scene's: one per scene,
    # inside the range.
    keep = (bright["clear"] < 250) & (plain["clear"] > 40)
    gain = float(np.median(bright["clear"][keep] / plain["clear"][keep]))
    image = plain["key"].rsplit("_", 1)[0]  # the clear image (each motorcycle view is one)
    assert gains.setdefault(image, gain) == pytest.approx(gain, rel=0.02)
    assert 1.5 * 0.97 <= gain <= 3.0 * 1.03
  assert len(gains) == SMALL.train_rooms + SMALL.motorcycle_views
  assert max(gains.values()) - min(gains.values()) > 0.1  # drawn per scene, not one for all


def test_motorcycle_depth_from_disparity():
  _, _, disparity = skdata.stereo_motorcycle()
  valid = np.isfinite(disparity)
  depth = scenes.disparity_to_depth(disparity)
  # Middlebury: Z = f * baseline / (d + doffs), values documented for this image size.
  expected = 994.978 * 0.193001 / (disparity[valid].astype(np.float64) + 31.086)
  np.testing.assert_allclose(depth[valid], expected, rtol=1e-12)
  assert np.isnan(depth[~valid]).all()
  assert 2.0 < expected.min() and expected.max() < 5.1
  filled = scenes.fill_invalid_disparity(disparity)
  assert np.isfinite(filled).all()
  np.testing.assert_array_equal(filled[valid], disparity[valid])
  # A hole takes the background (smaller disparity) of its scanline neighbours.
  row = np.array([[5.0, np.inf, np.nan, 9.0, np.inf]])
  np.testing.assert_array_equal(scenes.fill_invalid_disparity(row), [[5.0, 5.0, 5.0, 9.0, 9.0]])
  column = np.array([[np.nan, 1.0], [np.nan, np.nan], [np.nan, 2.0]])
  assert np.isfinite(scenes.fill_invalid_disparity(column)).all()


def test_room_depth_is_exact_z_depth():
  rgb, depth, info = scenes.render_room(np.random.default_rng(7), (40, 56),
                                        scenes.TRAIN_POSTERS, supersample=1, return_info=True)
  assert rgb.shape == (40, 56, 3) and 0 <= rgb.min() and rgb.max() <= 1
  # Back-project each pixel with the pinhole model: X_cam = depth * ((u - cx)/f, -(v - cy)/f, 1).
  v, u = np.mgrid[0:40, 0:56] + 0.5
  cam = np.stack([(u - 28) / info["focal"], -(v - 20) / info["focal"], np.ones_like(u)], -1)
  world = info["eye"] + (depth[..., None] * cam) @ np.asarray(info["rotation"], np.float64).T
  width, room_depth, height = info["room"]
  label = info["label"]
  assert (label == 2).any() and (label == 5).any() and (label >= 6).any()
  np.testing.assert_allclose(world[label == 2][:, 1], 0.0, atol=1e-4)  # floor
  np.testing.assert_allclose(world[label == 5][:, 2], room_depth, atol=1e-4)  # back wall
  side = (label == 0) | (label == 1)
  np.testing.assert_allclose(np.abs(world[side][:, 0]), width / 2, atol=1e-4)
  if (label == 3).any():
    np.testing.assert_allclose(world[label == 3][:, 1], height, atol=1e-4)
  # Furniture stands inside the room, in front of the walls behind it.
  boxes = world[label >= 6]
  assert (boxes[:, 1] >= -1e-4).all() and (boxes[:, 2] <= room_depth + 1e-4).all()


def test_one_scene_is_rendered_alone_as_generate_renders_it(examples):
  assert synthetic.num_scenes("train", SMALL) == SMALL.train_rooms + SMALL.motorcycle_views
  per = SMALL.hazes_per_scene
  for position in (0, synthetic.num_scenes("train", SMALL) - 1):  # a room, a motorcycle view
    alone = list(synthetic.scene_examples("train", position, SMALL))
    expected = examples["train"][position * per:(position + 1) * per]
    assert [ex["key"] for ex in alone] == [ex["key"] for ex in expected]
    for x, y in zip(alone, expected):
      np.testing.assert_array_equal(x["hazy"], y["hazy"])
  with pytest.raises(ValueError, match="position 5 is outside the 5 scenes of 'train'"):
    next(synthetic.scene_examples("train", 5, SMALL))
