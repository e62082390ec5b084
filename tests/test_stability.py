"""Theorem-1 estimators against dense linear algebra."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax.stability import spectral
from minet_jax import stability
from minet_jax.core.model import IMBlock
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
  # The returned vector is the dominant eigenvector (q's column for 0.7), up to sign.
  np.testing.assert_allclose(abs(float(jnp.vdot(radius["vector"], q[:, -1]))), 1.0, rtol=1e-3)


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


def _krylov(a: np.ndarray, r0: np.ndarray, iters: int) -> np.ndarray:
  matvec, _ = spectral.linearise(lambda v: jnp.asarray(a, jnp.float32) @ v, jnp.zeros(a.shape[0]))
  return spectral.krylov_residuals(spectral.arnoldi(matvec, jnp.asarray(r0, jnp.float32),
                                                    num_iters=iters))


def test_krylov_residuals_match_brute_force_gmres():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(12, 12)) * 0.25
  r0 = rng.normal(size=12)
  got = _krylov(a, r0, 8)
  # Dense reference: min ||r0 - (I - A) K c|| over the power basis K = [r0, A r0, ...].
  for j in range(1, 9):
    basis = np.stack([np.linalg.matrix_power(a, i) @ r0 for i in range(j)], axis=1)
    m = (np.eye(12) - a) @ basis
    c = np.linalg.lstsq(m, r0, rcond=None)[0]
    assert got[j - 1] == pytest.approx(np.linalg.norm(r0 - m @ c) / np.linalg.norm(r0),
                                       rel=1e-3, abs=1e-6)


def test_krylov_gains_nothing_on_a_disk_and_much_on_one_side():
  # A normal map whose 16 eigenvalues r exp(2 pi i k / 16) ring the origin, started with
  # equal weight on every eigenvector: for degree j < 16, the best p with p(1) = 1 has
  # ||p(J) r0||^2 / ||r0||^2 = 1 / sum_{i <= j} r^(-2i) (the powers are orthogonal over
  # the ring), against r^j for Picard: only a factor sqrt(1 - r^2) better.
  r, n = 0.8, 16
  blocks = [np.array([[r]]), np.array([[-r]])]
  for k in range(1, n // 2):
    t = 2 * np.pi * k / n
    blocks.append(r * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]))
  a = np.zeros((n, n))
  r0 = np.zeros(n)
  i = 0
  for blk in blocks:
    d = blk.shape[0]
    a[i:i + d, i:i + d] = blk
    r0[i] = 1.0 if d == 2 else np.sqrt(0.5)  # each eigenvector holds the same energy
    i += d
  q = np.linalg.qr(np.random.default_rng(4).normal(size=(n, n)))[0]
  got = _krylov(q @ a @ q.T, q @ r0, 10)
  want = np.array([np.sum(r ** (-2.0 * np.arange(j + 1))) ** -0.5 for j in range(1, 11)])
  np.testing.assert_allclose(got, want, rtol=1e-3)
  assert np.all(got > 0.6 * r ** np.arange(1, 11))  # Picard: r^j
  # The same moduli on the negative real axis: a Krylov method is far ahead of Picard.
  side = q @ np.diag(-np.linspace(0.05, r, n)) @ q.T
  assert _krylov(side, q @ r0, 10)[4] < 1e-2 * r ** 5


def _tiny_block(eta: float, stage: float = 1.0):
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(6,), dilations=(2,), eta=eta,
                              stage_fraction=stage)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
  return block


def test_block_analysis_refuses_batches_and_bfloat16_features():
  block = _tiny_block(0.3)
  g0 = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
  with pytest.raises(ValueError, match="batch 1"):
    stability.analyse_block(block, jnp.concatenate([g0, g0]), jnp.concatenate([g0, g0]),
                            key=jax.random.key(2))
  half = g0.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="runs in float32, got bfloat16 / bfloat16 features"):
    stability.analyse_block(block, half, half, key=jax.random.key(2))


@pytest.mark.parametrize("eta,stage", [(0.3, 1.0), (2.0, 1.0), (5.0, 0.25)])
def test_block_analysis_matches_dense_jacobian(eta, stage):
  block = _tiny_block(eta, stage)
  g0 = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
  # The solution the report is about: the stage for a stage block, its answer otherwise.
  g = block.stage_of(g0, block(g0))
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
  # The solved map's Jacobian is stage * eta * df/dg: Theorem 1 bounds |lambda(df/dg)| by
  # 1 / (stage * eta), and the same dense matrix is that step times df/dg.
  assert report["stage_fraction"] == stage
  assert report["theorem1_bound"] == pytest.approx(1.0 / (stage * eta))
  assert report["max_abs_eigenvalue_df"] == pytest.approx(report["spectral_radius"] / (stage * eta))
  history = np.asarray(report["residual_history"])
  # The first six Picard steps from g0 are the block's own iterations.
  assert len(history) == 40 and np.all(np.isfinite(history))
  if true_radius < 0.5:  # Picard settles at the linearised rate.
    assert report["observed_ratio_tail"] == pytest.approx(true_radius, abs=0.1)
  else:  # Beyond Theorem 1 the residuals do not fall.
    assert report["observed_ratio_tail"] > 0.9


def test_cli_writes_json_and_plots(tmp_path, capsys, random_params):
  from PIL import Image

  # Block 1 solves a stage (fraction 0.5), block 2 an implicit Euler step.
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(3, 3), dilations=(1, 2),
                              stage_fraction=(0.5, 1.0))
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
    assert block["operating_steps"] == block["iterations"] == 3  # unrolled: T itself
    assert (out / f"block{i}_residuals.png").read_bytes()[:4] == b"\x89PNG"
  # The figures name the map each block solves: s eta df/dg for the stage block.
  stage, euler = report["blocks"]
  assert (stage["stage_fraction"], euler["stage_fraction"]) == (0.5, 1.0)
  assert stage["theorem1_bound"] == pytest.approx(2.0) and euler["theorem1_bound"] == 1.0
  from minet_jax.stability import report as report_lib
  titles = [report_lib.plot_block(b, i, tmp_path / f"p{i}.png").axes[0].get_title()
            for i, b in enumerate(report["blocks"])]
  assert titles[0].startswith("IM-block 1 (dilation 1): rho(0.5 eta df/dg) = "), titles[0]
  assert titles[1].startswith("IM-block 2 (dilation 2): rho(eta df/dg) = "), titles[1]
  out_text = capsys.readouterr().out
  assert "Theorem 1" in out_text and "take more (--steps)" not in out_text
  # A residual curve shorter than T leaves observed@T without its steps: said so.
  short = {"blocks": [dict(b, residual_history=b["residual_history"][:2])
                      for b in report["blocks"]]}
  assert stability.summary_lines(short)[-1] == (
      "observed@T is partial or nan for block(s) 1, 2: the residual curve (2 Picard steps) "
      "stops before the steps T the model's solve took; take more (--steps)")
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
  assert err.startswith(f"{cli._prog()}: error: "), err  # Named, as argparse names it.
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


@pytest.fixture
def cli_inputs(tmp_path, random_params):
  """A checkpoint of a tiny model and a 14x11 image: (ckpt, image)."""
  from PIL import Image
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(3, 3), dilations=(1, 2))
  minet_jax.save(random_params(cfg), tmp_path / "ckpt")
  rgb = (np.random.default_rng(0).uniform(size=(14, 11, 3)) * 255).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "in.png")
  return tmp_path / "ckpt", tmp_path / "in.png"


@pytest.mark.parametrize("flags, message", [
    (["--radius-iters", "0"], "--radius-iters must be >= 1, got 0"),
    (["--arnoldi-iters", "0"], "--arnoldi-iters must be >= 1, got 0"),
    (["--norm-iters", "-1"], "--norm-iters must be >= 1, got -1"),
    (["--radius-iters", "8", "--radius-window", "9"],
     "--radius-window must be in [1, radius-iters = 8], got 9"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
])
def test_cli_settings_are_refused_up_front(tmp_path, capsys, flags, message):
  # These used to fail inside the analysis, with a traceback, after the model had run.
  with pytest.raises(SystemExit) as e:
    cli.main(["--ckpt", str(tmp_path / "none"), "--image", str(tmp_path / "none.png"),
              "--out", str(tmp_path / "out"), *flags])
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err and "Traceback" not in err
  assert not (tmp_path / "out").exists()



def test_cli_ckpt_takes_what_the_other_tools_take(cli_inputs, tmp_path, monkeypatch, capsys):
  from minet_jax import hub
  ckpt, image = cli_inputs
  monkeypatch.chdir(tmp_path)  # No folder named "its" here: the name is the release.
  monkeypatch.setattr(hub, "pretrained", lambda name, **kw: minet_jax.load(ckpt))  # No download.
  base = ["--image", str(image), "--steps", "3", "--radius-iters", "2", "--radius-window", "1",
          "--arnoldi-iters", "2", "--norm-iters", "2"]
  assert cli.main(["--ckpt", "its", "--out", str(tmp_path / "released"), *base]) == 0
  assert (tmp_path / "released" / "stability.json").is_file()
  bad = tmp_path / "model.pth"
  bad.write_bytes(b"not a pickle")
  assert cli.main(["--ckpt", str(bad), "--out", str(tmp_path / "bad"), *base]) == 2
  err = capsys.readouterr().err
  assert "could not load the model" in err and "model.pth" in err
  assert "not a checkpoint folder" not in err and not (tmp_path / "bad").exists()


def test_cli_checks_the_output_folder_first(cli_inputs, tmp_path, capsys, monkeypatch):
  ckpt, image = cli_inputs
  base = ["--ckpt", str(ckpt), "--image", str(image), "--steps", "3", "--radius-iters", "2",
          "--radius-window", "1", "--arnoldi-iters", "2", "--norm-iters", "2"]
  # Nothing may run before these refusals: the analysis is made to fail if it starts.
  monkeypatch.setattr(stability, "analyse_image", lambda *a, **k: pytest.fail("analysed"))
  (tmp_path / "afile").write_text("x")
  for out, message in ((tmp_path / "afile", "is a file, not a folder"),
                       (tmp_path / "afile" / "sub", "cannot be created: "),
                       (ckpt, "already holds files; choose another folder, or pass "
                              "--overwrite")):
    assert cli.main(base + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
  assert (tmp_path / "afile").read_text() == "x"
  if os.geteuid() != 0:  # Permissions do not bind root.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(base + ["--out", str(locked / "report")]) == 2
    assert "cannot be written" in capsys.readouterr().err
  assert cli.main(base + ["--image", str(tmp_path), "--out", str(tmp_path / "new")]) == 2
  assert "it is a folder, not an image file" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()
  # Names the system refuses, and a folder where a report file goes (even with
  # --overwrite): one line each, before the analysis, instead of a traceback after it.
  assert cli.main(base + ["--out", str(tmp_path / ("o" * 300))]) == 2
  err = capsys.readouterr().err
  assert "File name too long" in err and err.count("\n") == 1, err
  (tmp_path / "taken" / "block2_residuals.png").mkdir(parents=True)
  assert cli.main(base + ["--out", str(tmp_path / "taken"), "--overwrite"]) == 2
  err = capsys.readouterr().err
  assert "holds a folder named block2_residuals.png" in err and err.count("\n") == 1, err


def test_cli_overwrite_and_bfloat16_checkpoints(cli_inputs, tmp_path, capsys):
  ckpt, image = cli_inputs
  base = ["--image", str(image), "--steps", "3", "--radius-iters", "2", "--radius-window", "1",
          "--arnoldi-iters", "2", "--norm-iters", "2"]
  out = tmp_path / "report"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  assert cli.main(["--ckpt", str(ckpt), "--out", str(out), "--overwrite", *base]) == 0
  assert (out / "stability.json").is_file() and (out / "notes.txt").read_text() == "mine"
  capsys.readouterr()
  bf16 = tmp_path / "bf16"
  minet_jax.save(minet_jax.load(ckpt).replace_config(dtype="bfloat16"), bf16)
  assert cli.main(["--ckpt", str(bf16), "--out", str(tmp_path / "b"), *base]) == 2
  err = capsys.readouterr().err
  assert "computes in bfloat16" in err and "--as-float32" in err and err.count("\n") == 1
  assert cli.main(["--ckpt", str(bf16), "--out", str(tmp_path / "b"), "--as-float32",
                   *base]) == 0
  analysed = json.loads((tmp_path / "b" / "stability.json").read_text())
  assert analysed["config"]["dtype"] == "float32"


def test_console_script_usage_names_itself(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["/usr/local/bin/minet-stability", "--help"])
  with pytest.raises(SystemExit):
    cli.main()
  assert capsys.readouterr().out.startswith("usage: minet-stability ")


def test_cli_solves_as_told_where_asked(cli_inputs, tmp_path, capsys):
  # The operating point is where the solver stops: the checkpoint's (3 unrolled steps,
  # test_cli_writes_json_and_plots) by default, and --solver / --rtol / --max-steps move
  # it, e.g. closer to the fixed point.
  ckpt, image = cli_inputs
  base = ["--ckpt", str(ckpt), "--image", str(image), "--steps", "3", "--radius-iters", "2",
          "--radius-window", "1", "--arnoldi-iters", "2", "--norm-iters", "2"]
  assert minet_jax.load(ckpt).config.solver == "unrolled"
  assert cli.main(base + ["--out", str(tmp_path / "tight"), "--solver", "picard", "--rtol",
                          "1e-5", "--max-steps", "9"]) == 0
  tight = json.loads((tmp_path / "tight" / "stability.json").read_text())
  assert tight["config"]["solver"] == "picard" and tight["config"]["rtol"] == 1e-5
  assert tight["config"]["iterations"] == [9, 9]
  assert all(b["model_steps"] > 3 for b in tight["blocks"]), tight["blocks"]
  # The observed rate at the operating point is read where each solve stopped, not at
  # the step cap, and the printed table says how each block was solved.
  table = capsys.readouterr().out.splitlines()
  header = next(i for i, line in enumerate(table) if line.lstrip().startswith("block"))
  assert table[header].split()[-3:] == ["steps", "residual", "solve"]
  for b, line in zip(tight["blocks"], table[header + 1:header + 3]):
    t = b["operating_steps"]
    assert b["iterations"] == 9 and t == b["model_steps"] <= 9
    assert b["residual_at_T"] == pytest.approx(b["residual_history"][t - 1]) if t <= 3 \
        else np.isnan(b["residual_at_T"])
    cells = line.split()
    assert int(cells[-3]) == b["model_steps"] and cells[-1] == b["model_status"]
    assert float(cells[-2]) == pytest.approx(b["model_residual"], rel=0.06)
    assert b["model_status"] in ("successful", "max_steps_reached")
  # A bad override is refused before the model is even loaded (a missing one here).
  for flags, message in ((["--rtol", "-1"], "--rtol: rtol must be finite and >= 0, got -1.0"),
                         (["--max-steps", "-2"], "argument --max-steps: must be an integer >= 1")):
    with pytest.raises(SystemExit) as e:
      cli.main(["--ckpt", str(tmp_path / "missing"), "--image", str(image), "--out",
                str(tmp_path / "bad"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_two_stage_block_is_analysed_at_both_stages(random_params):
  # Block 2 takes two SDIRK stages: its report is that of its stage with the larger
  # radius, each stage's figures are analyse_block's at that stage's (base, solution),
  # and Theorem 1 holds for the block only where it holds at both.
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(6, 6), dilations=(1, 2),
                              stage_fraction=(1.0, 0.5), stages=(1, 2), solver="picard")
  params = random_params(cfg)
  image = np.random.default_rng(0).uniform(size=(10, 12, 3)).astype(np.float32)
  settings = dict(steps=4, radius_iters=8, radius_window=4, arnoldi_iters=4, norm_iters=4)
  report = stability.analyse_image(params, image, seed=3, **settings)
  one, two = report["blocks"]
  assert "stages" not in one and len(two["stages"]) == 2
  model = minet_jax.model_from_params(params)
  runs = nnx.jit(lambda m, x: m.solve_blocks(m.model_input(x)))(model,
                                                                jnp.asarray(image[None]))
  # The second stage's figures are analyse_block's at its own base and solution.
  key = jax.random.split(jax.random.key(3), 2)[1]
  (base, g) = runs[1].points[1]
  alone = stability.analyse_block(model.im_blocks[1], base, g,
                                  key=spectral.stage_keys(key, 2)[1], **settings)
  assert two["stages"][1] == pytest.approx(
      {name: alone[name] for name in stability.STAGE_FIGURES}, rel=1e-5)
  assert two["stages"][0]["spectral_radius"] != two["stages"][1]["spectral_radius"]
  assert two["spectral_radius"] == max(s["spectral_radius"] for s in two["stages"])
  assert two["theorem1_holds"] == all(s["theorem1_holds"] for s in two["stages"])
