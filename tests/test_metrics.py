"""PSNR/SSIM in JAX against scikit-image and the authors' published protocol scores."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from minet_jax import image_io, metrics


def _sk_ssim(out, gt):
  return structural_similarity(gt.astype(np.float64), out.astype(np.float64),
                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                               channel_axis=2, data_range=255)


@pytest.mark.parametrize("seed,noise,shape", [(0, 5.0, (40, 52, 3)), (1, 40.0, (23, 31, 3)),
                                              (2, 1.0, (11, 11, 3))])
def test_random_images_match_skimage(seed, noise, shape):
  rng = np.random.default_rng(seed)
  gt = rng.uniform(0, 255, shape)
  out = np.clip(gt + rng.normal(0, noise, shape), 0, 255)
  assert abs(float(metrics.psnr(out, gt)) -
             peak_signal_noise_ratio(gt, out, data_range=255)) < 1e-4
  assert abs(float(metrics.ssim(out, gt)) - _sk_ssim(out, gt)) < 1e-4


def test_flat_regions_and_batch():
  # Smooth, nearly constant images stress float32 cancellation in the variances.
  y, x = np.mgrid[0:48, 0:64] / 64.0
  gt = np.stack([200 + 2 * x, 120 + y, 30 + x * y], -1)
  out = gt + 0.7 * np.sin(9 * x)[..., None]
  assert abs(float(metrics.ssim(out, gt)) - _sk_ssim(out, gt)) < 1e-4
  batch = np.stack([out, gt])
  got = np.asarray(metrics.ssim(batch, np.stack([gt, gt])))
  assert got.shape == (2,)
  np.testing.assert_allclose(got, [_sk_ssim(out, gt), 1.0], atol=1e-4)


def test_ssim_detects_structure_change():
  rng = np.random.default_rng(3)
  gt = rng.uniform(0, 255, (32, 32, 3))
  assert float(metrics.ssim(gt, gt)) == pytest.approx(1.0, abs=1e-6)
  assert float(metrics.ssim(gt[::-1], gt)) < 0.2


def test_ssim_needs_a_whole_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((8, 20, 3)), np.zeros((8, 20, 3)))


def test_images_on_a_0_to_1_scale_need_their_data_range():
  rng = np.random.default_rng(4)
  gt = rng.uniform(0, 1, (16, 16, 3))
  out = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
  want = peak_signal_noise_ratio(gt, out, data_range=1.0)
  assert abs(float(metrics.psnr(out, gt, data_range=1.0)) - want) < 1e-4
  for score in (metrics.psnr, metrics.ssim):  # The default 255 would read 48 dB too high.
    with pytest.raises(ValueError, match="look like 0..1 data.*pass data_range=1.0"):
      score(out, gt)
    with pytest.raises(ValueError, match="look like 0..1 data"):  # An unclipped output.
      score(out * 1.03, gt)
    with pytest.raises(ValueError, match=r"one shape, got output \(16, 16, 3\) and target "
                                         r"\(16, 16, 1\)"):  # skimage refuses it too
      score(out, gt[..., :1], data_range=1.0)
  # A dark 0..255 image is no mistake in integers, or beside a brighter one; inside a
  # trace values are not seen.
  dark = (gt * 2).astype(np.uint8)
  assert np.isfinite(float(metrics.psnr(dark, np.ones_like(dark))))
  assert np.isfinite(metrics.dehazing_scores(out * 0.5, dark)[0])
  assert np.isfinite(float(metrics.psnr(out * 0.5, gt * 40)))
  assert float(jax.jit(metrics.psnr)(out, gt)) == pytest.approx(want + 20 * np.log10(255), 1e-4)


def test_real_images_protocol_scores(shared_dir):
  """Hazy-input scores of the published protocol, incl. a 640x480 GT (1400) and a 620x460 one."""
  scores = json.loads((shared_dir / "parity" / "official_scores.json").read_text())
  sots = shared_dir / "data" / "RESIDE" / "SOTS" / "indoor"
  for name in ("1400_1.png", "1403_8.png"):
    hazy = image_io.read_rgb(sots / "hazy" / name, np.uint8).astype(np.float64)
    gt = image_io.read_rgb(sots / "gt" / (name.split("_")[0] + ".png"), np.uint8)
    gt = image_io.centre_crop(gt.astype(np.float64), *hazy.shape[:2])
    p, s = metrics.dehazing_scores(hazy, image_io.read_rgb(
        sots / "gt" / (name.split("_")[0] + ".png"), np.uint8))
    assert abs(p - peak_signal_noise_ratio(gt, hazy, data_range=255)) < 1e-4
    assert abs(s - _sk_ssim(hazy, gt)) < 1e-4
    ref_p, ref_s = scores["per_image"][name]["hazy_input"]
    assert p == pytest.approx(ref_p, abs=1e-3) and s == pytest.approx(ref_s, abs=1e-5)


def test_dehazing_scores_clips_output():
  rng = np.random.default_rng(4)
  gt = rng.uniform(0, 255, (20, 20, 3))
  out = gt.copy()
  out[0, 0, 0] = 400.0  # clipped to 255 before scoring
  p, _ = metrics.dehazing_scores(out, gt)
  clipped = np.clip(out, 0, 255)
  assert p == pytest.approx(peak_signal_noise_ratio(gt, clipped, data_range=255), abs=1e-4)


def test_protocol_scores_of_a_batch_match_per_image_scores():
  rng = np.random.default_rng(5)
  out = rng.uniform(-20, 275, (2, 16, 18, 3))  # Unclipped, as a model may give.
  gt = rng.uniform(0, 255, (2, 20, 22, 3))  # Larger: centre-cropped.
  p, s = metrics.protocol_scores(out, gt)
  assert p.shape == s.shape == (2,)
  for i in range(2):
    np.testing.assert_allclose((p[i], s[i]), metrics.dehazing_scores(out[i], gt[i]), rtol=1e-6)
