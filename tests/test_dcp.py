"""Dark channel prior: building blocks against direct computations, and real haze removal."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from scipy import ndimage

from minet_jax import dcp, metrics


def test_dark_channel_matches_minimum_filter():
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(23, 31, 3)).astype(np.float32)
  # mode="nearest" replicates the border, i.e. the window is clipped to the image.
  want = ndimage.minimum_filter(img.min(-1), size=7, mode="nearest")
  np.testing.assert_array_equal(np.asarray(dcp.dark_channel(img, 7)), want)
  with pytest.raises(ValueError, match="odd"):
    dcp.dark_channel(img, 4)


def test_box_mean_and_guided_filter_match_direct_sums():
  rng = np.random.default_rng(1)
  guide = rng.uniform(size=(13, 17)).astype(np.float32)
  src = rng.uniform(size=(13, 17)).astype(np.float32)
  r, eps = 3, 1e-2

  def naive_box(x):
    out = np.empty_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
      for j in range(x.shape[1]):
        out[i, j] = x[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].mean()
    return out

  np.testing.assert_allclose(np.asarray(dcp.box_mean(src, r)), naive_box(src), atol=1e-6)
  g, p = guide.astype(np.float64), src.astype(np.float64)
  mg, mp = naive_box(g), naive_box(p)
  a = (naive_box(g * p) - mg * mp) / (naive_box(g * g) - mg * mg + eps)
  b = mp - a * mg
  want = naive_box(a) * g + naive_box(b)
  np.testing.assert_allclose(np.asarray(dcp.guided_filter(guide, src, r, eps)), want, atol=1e-5)


@pytest.fixture(scope="module")
def synthetic_haze():
  """Middlebury motorcycle with haze rendered from its own disparity (depth ~ 1/disparity)."""
  left, _, disp = skimage.data.stereo_motorcycle()
  clear = left[::2, ::2].astype(np.float32) / 255.0
  disp = disp[::2, ::2]
  disp = np.where(np.isfinite(disp), disp, np.nanmin(np.where(np.isfinite(disp), disp, np.nan)))
  depth = disp.min() / disp  # 1 at the farthest point
  t = np.exp(-2.0 * depth)[..., None].astype(np.float32)
  airlight = np.array([0.9, 0.92, 0.95], np.float32)
  return clear, clear * t + airlight * (1.0 - t), t[..., 0], airlight


def test_dcp_removes_synthetic_haze(synthetic_haze):
  clear, hazy, t_true, airlight = synthetic_haze
  out, t_est, a_est = dcp.dehaze_with_maps(hazy, guided_radius=30)
  out = np.asarray(out)
  assert out.shape == hazy.shape and out.min() >= 0 and out.max() <= 1
  before = float(metrics.psnr(hazy * 255, clear * 255))
  after = float(metrics.psnr(out * 255, clear * 255))
  assert after > before + 2.5, (before, after)
  assert float(metrics.ssim(out * 255, clear * 255)) > float(metrics.ssim(hazy * 255, clear * 255))
  np.testing.assert_allclose(np.asarray(a_est), airlight, atol=0.05)
  assert np.corrcoef(np.asarray(t_est).ravel(), t_true.ravel())[0, 1] > 0.3
  # The guided-filter refinement helps over the blocky patch transmission.
  coarse = np.asarray(dcp.dehaze(hazy, refine=False))
  assert after > float(metrics.psnr(coarse * 255, clear * 255))


def test_haze_free_image_is_nearly_unchanged():
  # Dark channel ~ 0 means t ~ 1: a saturated, haze-free image passes through almost unchanged.
  rng = np.random.default_rng(2)
  img = rng.uniform(size=(40, 40, 3)).astype(np.float32)
  img[..., 2] = 0.0  # zero dark channel everywhere
  out = np.asarray(dcp.dehaze(img))
  assert float(metrics.psnr(out * 255, img * 255)) > 30


def test_input_is_taken_and_refused_as_apply_does():
  rng = np.random.default_rng(5)
  img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(dcp.dehaze(img)),
                             np.asarray(dcp.dehaze(img.astype(np.float32) / 255)), atol=1e-6)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*divide 0..255 data by 255"):
    dcp.dehaze(img.astype(np.float32))  # Used to come out all white.
  with pytest.raises(ValueError, match="takes one .* image, got shape \\(2, 24, 24, 3\\)"):
    dcp.dehaze(np.stack([img, img]))
  with pytest.raises(ValueError, match="grayscale"):
    dcp.dehaze_with_maps(img[..., 0])


def test_evaluations_dcp_is_dcp_dehaze(synthetic_haze):
  """evaluate.py's "dcp" method (compiled ahead of time per shape) is `dcp.dehaze`."""
  from minet_jax import evaluation
  _, hazy, _, _ = synthetic_haze
  config = dcp.DCPConfig(guided_radius=30)
  method = evaluation.build_methods(["dcp"], dcp_config=config)["dcp"]
  np.testing.assert_array_equal(np.asarray(method(np.asarray(hazy, np.float32))),
                                np.asarray(dcp.dehaze(hazy, config)))
