"""Theorem-1 estimators against dense linear algebra."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax import spectral, stability
from minet_jax.model import IMBlock
from minet_jax.stability import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _estimates(a: np.ndarray, *, radius_iters=300, window=100, arnoldi_iters=12):
  a = jnp.asarray(a, jnp.float32)
  matvec, rmatvec = spectral.linearise(lambda v: a @ v, jnp.zeros(a.shape[0]))
  keys = jax.random.split(jax.random.key(0), 3)
  v = [jax.random.normal(k, (a.shape[0],)) for k in keys]
  radius = spectral.spectral_radius(matvec, v[0], num_iters=radius_iters, window=window)
  ritz = spectral.ritz_summary(spectral.arnoldi(matvec, v[1], num_iters=arnoldi_iters))
  norm = spectral.spectral_norm(matvec, rmatvec, v[2], num_iters=200)
  return float(radius["radius"]), ritz["radius"], float(norm["norm"]), radius


def test_symmetric_map_radius_and_norm():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  eig = np.linspace(-0.3, 0.7, 12)
  growth, arnoldi, norm, radius = _estimates(q @ np.diag(eig) @ q.T)
  assert growth == pytest.approx(0.7, rel=1e-3)
  assert arnoldi == pytest.approx(0.7, rel=1e-4)
  assert norm == pytest.approx(0.7, rel=1e-4)
  assert float(radius["rayleigh"]) == pytest.approx(0.7, rel=1e-3)


def test_non_normal_map_norm_exceeds_radius():
  rng = np.random.default_rng(1)
  a = np.triu(rng.normal(size=(10, 10)), 1) * 0.8 + np.diag(np.linspace(0.1, 0.6, 10))
  s = np.linalg.qr(rng.normal(size=(10, 10)))[0]
  a = s @ a @ s.T  # Same spectrum and norm, no longer triangular.
  true_radius = np.max(np.abs(np.linalg.eigvals(a)))
  true_norm = np.linalg.norm(a, 2)
  assert true_norm > 2 * true_radius  # The case the estimators must tell apart.
  growth, arnoldi, norm, _ = _estimates(a, arnoldi_iters=10)
  assert growth == pytest.approx(true_radius, rel=3e-2)
  assert arnoldi == pytest.approx(true_radius, rel=1e-3)
  assert norm == pytest.approx(true_norm, rel=1e-4)


def test_complex_dominant_pair_is_found_by_growth_rate_and_arnoldi():
  theta = 1.1
  rot = 0.8 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  a = np.zeros((8, 8))
  a[:2, :2] = rot
  a[2:, 2:] = np.diag(np.linspace(-0.5, 0.5, 6))
  growth, arnoldi, _, radius = _estimates(a, window=150)
  assert growth == pytest.approx(0.8, rel=1e-2)
  assert arnoldi == pytest.approx(0.8, rel=1e-4)
  # The Rayleigh quotient of a rotating pair is nowhere near +-rho.
  assert abs(float(radius["rayleigh"])) < 0.8 * np.cos(theta) + 0.05


def _tiny_block(eta: float):
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(6,), dilations=(2,), eta=eta)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
  return block


@pytest.mark.parametrize("eta", [0.3, 2.0])
def test_block_analysis_matches_dense_jacobian(eta):
  block = _tiny_block(eta)
  g0 = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
  g = block(g0)
  t_map, f_state = block.map_fn()
  jac = jax.jacfwd(lambda z: t_map(z.reshape(g.shape), (g0, f_state)).ravel())(g.ravel())
  jac = np.asarray(jac, np.float64)
  true_radius = np.max(np.abs(np.linalg.eigvals(jac)))
  true_norm = np.linalg.norm(jac, 2)
  report = stability.analyse_block(block, g0, g, key=jax.random.key(2), steps=40,
                                   radius_iters=300, radius_window=100, arnoldi_iters=60,
                                   norm_iters=100)
  assert report["spectral_radius_arnoldi"] == pytest.approx(true_radius, rel=1e-3)
  assert report["spectral_radius"] == pytest.approx(true_radius, rel=2e-2)
  assert report["spectral_norm"] == pytest.approx(true_norm, rel=1e-3)
  assert report["theorem1_holds"] == (true_radius < 1.0)
  assert report["max_abs_eigenvalue_df"] == pytest.approx(report["spectral_radius"] / eta)
  history = np.asarray(report["residual_history"])
  # The first six Picard steps from g0 are the block's own iterations.
  assert len(history) == 40 and np.all(np.isfinite(history))
  if true_radius < 0.5:  # Picard settles at the linearised rate.
    assert report["observed_ratio_tail"] == pytest.approx(true_radius, abs=0.1)
  else:  # Beyond Theorem 1 the residuals do not fall.
    assert report["observed_ratio_tail"] > 0.9


def test_cli_writes_json_and_plots(tmp_path, capsys, random_params):
  from PIL import Image

  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(3, 3), dilations=(1, 2))
  minet_jax.save(random_params(cfg), tmp_path / "ckpt")
  rgb = (np.random.default_rng(0).uniform(size=(14, 11, 3)) * 255).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "in.png")
  out = tmp_path / "report"
  code = cli.main(["--ckpt", str(tmp_path / "ckpt"), "--image", str(tmp_path / "in.png"),
                         "--out", str(out), "--steps", "5", "--radius-iters", "8",
                         "--radius-window", "4", "--arnoldi-iters", "4", "--norm-iters", "4"])
  assert code == 0
  report = json.loads((out / "stability.json").read_text())
  assert report["image_size"] == [14, 11] and len(report["blocks"]) == 2
  for i, block in enumerate(report["blocks"], 1):
    assert len(block["residual_history"]) == 5 and block["model_steps"] == 3
    assert (out / f"block{i}_residuals.png").read_bytes()[:4] == b"\x89PNG"
  assert "Theorem 1" in capsys.readouterr().out
  assert cli.main(["--ckpt", str(tmp_path / "missing"), "--image", str(tmp_path / "in.png"),
                         "--out", str(out)]) == 2


def test_unsafe_pth_is_a_one_line_error(tmp_path, capsys):
  # A pickle that would run os.system: refused, reported on one line, nothing run.
  marker = tmp_path / "MARKER"
  (tmp_path / "evil.pth").write_bytes(
      b"\x80\x02cposix\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little") +
      f"touch {marker}".encode() + b"\x85R.")
  code = cli.main(["--pth", str(tmp_path / "evil.pth"), "--image", str(tmp_path / "x.png"),
                         "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "posix.system" in err, err
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_analysis_imports_no_plotting_and_the_module_runs(tmp_path):
  # The analysis is usable without matplotlib; the report and the CLI bring it in.
  script = "import sys, minet_jax.stability; print('matplotlib' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "False"
  result = subprocess.run([sys.executable, "-m", "minet_jax.stability", "--help"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "python -m minet_jax.stability" in result.stdout
