"""The measurement scripts in benchmarks/ that the documentation's figures come from.

They are run as users run them (a subprocess from the repository root) on small inputs,
so a change in the package they call breaks a test rather than the next measurement; the
arguments they must refuse are checked in this process (`_refused`), since a refusal
comes before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minet_jax
from minet_jax import metrics
from minet_jax.core import checkpoint
from minet_jax.core.params import Params
from minet_jax.data import folders
from conftest import checkout_env

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STABLE_MINET = REPO_ROOT / "benchmarks" / "stable_minet.py"


def _run(script: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  """Runs a benchmark script as a user does, on this checkout's package."""
  proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO_ROOT, env=checkout_env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _refused(script: pathlib.Path, *args: str, code: int = 2) -> str:
  """Runs a benchmark script's command line in this process on arguments it must refuse
  with exit ``code`` (2: argparse's), as the interpreter would run it (``__main__``, its
  folder first on the path); returns what it wrote to stderr. In-process because each
  refusal comes before any work, and a new interpreter would spend seconds importing."""
  stderr = io.StringIO()
  argv, path = sys.argv, list(sys.path)
  sys.argv, sys.path[:0] = [str(script), *args], [str(script.parent)]
  try:
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
      with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv, sys.path[:] = argv, path
  status = exit_info.value.code
  if isinstance(status, str):  # SystemExit("message"): the interpreter prints it, exit 1.
    stderr.write(status + "\n")
    status = 1
  assert status == code, stderr.getvalue()
  return stderr.getvalue()


def _small_shared(shared_dir: pathlib.Path, root: pathlib.Path,
                  size: tuple[int, int] = (48, 64)) -> pathlib.Path:
  """A reference folder laid out like ``../shared``: the authors' checkpoint and one SOTS
  pair cut down to ``size`` (top left corner), so every figure takes seconds."""
  (root / "weights").mkdir(parents=True)
  shutil.copyfile(shared_dir / "weights" / "minet_its_official.pth",
                  root / "weights" / "minet_its_official.pth")
  sots = root / "data/RESIDE/SOTS/indoor"
  record = next((r for r in folders.find_sots_pairs(shared_dir / "data/RESIDE/SOTS/indoor")
                 if r.key == "1400_1"), None)
  if record is None:
    pytest.fail(f"SOTS 1400_1 not found under {shared_dir}")
  hazy, gt = folders.load_pair(record)
  h, w = size
  for sub, image, name in (("hazy", hazy, "1400_1.png"), ("gt", gt, "1400.png")):
    (sots / sub).mkdir(parents=True)
    Image.fromarray(image[:h, :w]).save(sots / sub / name)
  (root / "README.md").write_text("a cut-down reference folder\n")
  return root


def _staged(released_params: Params, fractions: tuple[float, ...], weights=None,
            **changes) -> Params:
  """The released weights (or ``weights``) as stage blocks at ``fractions``, solved as the
  stable configs store it: Picard to rtol 1e-3, at most 30 steps, best-so-far answers."""
  return Params(weights=released_params.weights if weights is None else weights,
                config=dataclasses.replace(
                    released_params.config, stage_fraction=fractions, solver="picard",
                    rtol=1e-3, iterations=(30, 30, 30), best_so_far=True, **changes))


@pytest.mark.slow
def test_stable_minet_measures_both_models_and_prints_the_table(shared_dir, released_params,
                                                                tmp_path):
  small = _small_shared(shared_dir, tmp_path / "shared")
  # The stable model: the released weights as stage blocks (s = 0.3), Picard to 1e-3.
  stable = tmp_path / "stable"
  checkpoint.save(_staged(released_params, (0.3, 0.3, 0.3)), stable)
  out = tmp_path / "report.json"
  proc = _run(STABLE_MINET, "--stable", str(stable), "--shared", str(small), "--out", str(out),
              "--radius-iters", "3", "--cap", "4", "--time", "1", "--stage", "0.3",
              "--shrink", "0.3,1,1", "--fixed-point-rtol", "1e-4", "--fixed-point-cap", "5",
              "--curve-steps", "8,2")  # two points of the curve: each T is one more compile
  report = json.loads(out.read_text())
  curve_steps = [8, 2]

  assert report["images"] == ["1400_1"]
  released, solved = report["models"]["released"], report["models"]["stable"]
  # The released model's score is the package's own forward pass on the cut-down pair.
  record = folders.find_sots_pairs(small / "data/RESIDE/SOTS/indoor")[0]
  hazy, gt = folders.load_pair(record)
  y = np.asarray(minet_jax.apply(released_params, hazy))
  psnr, ssim = metrics.dehazing_scores(y * 255.0, gt.astype(np.float32))
  assert released["trained_solver"]["psnr"] == pytest.approx(psnr, abs=1e-3)
  assert released["trained_solver"]["ssim"] == pytest.approx(ssim, abs=1e-5)
  # Its 8 unrolled steps are reported as such; the stable model's solves as solves.
  assert released["trained_solver"]["rows"][0]["steps"] == [8, 8, 8]
  assert solved["solve"]["solver"] == "picard" and solved["checkpoint_step"] is None
  assert all(1 <= s <= 30 for s in solved["trained_solver"]["rows"][0]["steps"])
  for entry in (released, solved):
    for solver in ("picard", "anderson"):
      assert entry[solver]["cap"] == 4 and entry[solver]["solves"] == 3
      assert all(1 <= s <= 4 for s in entry[solver]["rows"][0]["steps"])
    assert [p["T"] for p in entry["psnr_vs_T"]] == curve_steps
    assert [r["block"] for r in entry["theorem1"]] == [1, 2, 3]
    assert all(np.isfinite([r["rho"], r["norm"]]).all() and r["rho"] > 0 for r in entry["theorem1"])
  # T = 8 unrolled is the released model itself.
  assert released["psnr_vs_T"][curve_steps.index(8)]["psnr"] == pytest.approx(psnr, abs=1e-3)
  assert "fixed_point" in solved and "fixed_point" not in released  # unrolled: skipped
  assert set(report["stage"]) == {"0.3,0.3,0.3"} and set(report["shrink"]) == {"0.3,1,1"}
  assert set(report["interleaved_seconds"]) == {"released", "stable"}
  # The summary table: both models, the stable one's time as a ratio to the released one's.
  seconds = report["interleaved_seconds"]
  assert "| released | unrolled (T/cap 8) |" in proc.stdout
  row = re.search(r"\| stable \| picard \(T/cap 30\) \| [\d.]+ \| [\d.]+ \| [\d.]+ "
                  r"\(([\d.]+)x\) \| \d/3 \(", proc.stdout)
  assert row, proc.stdout
  assert float(row.group(1)) == pytest.approx(seconds["stable"] / seconds["released"], abs=0.006)
  curve_rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
  assert [int(t) for t, _, _ in curve_rows] == curve_steps
  assert float(curve_rows[0][1]) == pytest.approx(psnr, abs=1e-3)
  # The default curve is the paper's Fig. 8 range; a step list must be distinct and >= 1.
  script = runpy.run_path(str(STABLE_MINET))
  assert script["CURVE_STEPS"][0] == 1 and 8 in script["CURVE_STEPS"]
  assert script["curve_steps"]("1,4,8") == (1, 4, 8)
  for bad in ("0,8", "8,8", "2.5", "a"):
    with pytest.raises(argparse.ArgumentTypeError):
      script["curve_steps"](bad)

  # A later run that measures no model keeps what the file holds and adds to it (how
  # docs/stability/stable_minet.json gathers its rows); another solver gets its own key.
  # The stable model's curve as an earlier run with other steps would have left it: the
  # table's rows are the T both curves have, in the released curve's order.
  solved["psnr_vs_T"] = [{"T": 2, "psnr": 20.5}, {"T": 4, "psnr": 21.5}]
  out.write_text(json.dumps(report))
  proc = _run(STABLE_MINET, "--models", "--shared", str(small), "--out", str(out),
              "--shrink", "0.3", "--shrink-solver", "anderson")
  merged = json.loads(out.read_text())
  assert merged["models"] == report["models"]
  curve_rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
  assert [(int(t), float(b)) for t, _, b in curve_rows] == [(2, 20.5)], proc.stdout
  assert set(merged["shrink"]) == {"0.3,1,1", "anderson:0.3,0.3,0.3"}
  assert merged["shrink"]["0.3,1,1"] == report["shrink"]["0.3,1,1"]


@pytest.mark.slow
def test_stable_compose_takes_each_block_from_its_model(shared_dir, released_params, tmp_path):
  import jax
  small = _small_shared(shared_dir, tmp_path / "shared")
  # A stage model whose blocks differ from the released ones (every block weight x 0.95).
  weights = dict(released_params.weights)
  weights["im_blocks"] = jax.tree.map(lambda w: w * 0.95, weights["im_blocks"])
  other = _staged(released_params, (0.3, 0.3, 0.3), weights,
                  contractive_target=(0.6, 0.5, 0.4))
  checkpoint.save(other, tmp_path / "other")
  pth = small / "weights" / "minet_its_official.pth"
  out, saved = tmp_path / "compose.json", tmp_path / "composed"
  # Blocks 1 and 2 from the saved model, block 3 from the authors' .pth at 0.5.
  _run(REPO_ROOT / "benchmarks" / "stable_compose.py", "--shared", str(small), "--out", str(out),
       "--save", str(saved), "--block", f"{tmp_path / 'other'}:0.3",
       "--block", f"{tmp_path / 'other'}:0.3", "--block", f"{pth}:0.5")
  composed = minet_jax.load(saved)
  expected_weights = dict(weights)
  expected_weights["im_blocks"] = {**weights["im_blocks"],
                                   "2": released_params.weights["im_blocks"]["2"]}
  jax.tree.map(np.testing.assert_array_equal, composed.weights, expected_weights)
  # Each block's radius target is its model's (the .pth: the default).
  assert composed.config == dataclasses.replace(
      other.config, stage_fraction=(0.3, 0.3, 0.5),
      contractive_target=(0.6, 0.5, released_params.config.contractive_target[2]))
  assert released_params.config.contractive_target[2] != 0.4
  record = folders.find_sots_pairs(small / "data/RESIDE/SOTS/indoor")[0]
  hazy, gt = folders.load_pair(record)
  psnr, _ = metrics.dehazing_scores(np.asarray(minet_jax.apply(composed, hazy)) * 255.0,
                                    gt.astype(np.float32))
  (result,) = json.loads(out.read_text()).values()
  assert result["stage_fraction"] == [0.3, 0.3, 0.5]
  assert result["psnr"] == pytest.approx(psnr, abs=1e-3)

  compose = REPO_ROOT / "benchmarks" / "stable_compose.py"
  stderr = _refused(compose, "--shared", str(small), "--block", str(pth))
  assert "expected PATH:FRACTION" in stderr, stderr
  missing = tmp_path / "missing"
  stderr = _refused(compose, "--shared", str(small), "--block", f"{missing}:0.3",
                    "--block", f"{pth}:0.3", "--block", f"{pth}:0.3")
  assert str(missing) in stderr and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_stable_radius_modes_reports_the_saturated_share(shared_dir, released_params, tmp_path):
  small = _small_shared(shared_dir, tmp_path / "shared")
  hazy_path = small / "data/RESIDE/SOTS/indoor/hazy/1400_1.png"
  hazy = np.asarray(Image.open(hazy_path)).copy()
  hazy[:16, :24] = 255  # 8 x 12 of the 24 x 32 feature pixels are saturated
  hazy[16:18, :24] = 252  # saturated too (>= 250): 1 x 12 more
  hazy[18, :24] = 249  # not: its 2 x 2 blocks are not all >= 250
  Image.fromarray(hazy).save(hazy_path)
  stable = tmp_path / "stable"
  checkpoint.save(_staged(released_params, (0.3, 0.3, 0.3)), stable)
  out = tmp_path / "modes.json"
  script = REPO_ROOT / "benchmarks" / "stable_radius.py"
  _run(script, "--modes", str(stable), "--block", "3", "--scales", "1", "0.5", "0.7",
       "--crops", "32", "--images", "1400_1", "--shared", str(small), "--out", str(out))
  report = json.loads(out.read_text())
  (rows,) = report["modes"].values()
  assert "from the Picard residual" in report["mode_estimate"]
  assert "radius_estimate" not in report
  crop = rows.pop(1)  # the 32 px crop comes right after the full-size row
  assert [(r["image"], r["scale"], r["size"]) for r in rows] == [
      ("1400_1", 1.0, [48, 64]), ("1400_1", 0.5, [24, 32]), ("1400_1", 0.7, [34, 45])]
  assert rows[0]["saturated"] == pytest.approx(9 * 12 / (24 * 32))
  # Centred on the full image's peak (feature pixels, so x 2), inside the image, even.
  top, left = crop["crop_origin"]
  assert crop["size"] == [32, 32] and top % 2 == left % 2 == 0
  assert 0 <= top <= 16 and 0 <= left <= 32
  py, px = rows[0]["peak"]
  assert top == min(max(2 * py - 16, 0), 16) // 2 * 2
  assert left == min(max(2 * px - 16, 0), 32) // 2 * 2
  window = hazy[top:top + 32, left:left + 32].min(-1) >= 250
  assert crop["saturated"] == pytest.approx(window.reshape(16, 2, 16, 2).all(axis=(1, 3)).mean())
  half = np.asarray(Image.fromarray(hazy).resize((32, 24), Image.BICUBIC))
  blocks = (half.min(-1) >= 250).reshape(12, 2, 16, 2).all(axis=(1, 3))
  assert rows[1]["saturated"] == pytest.approx(blocks.mean())
  # 34 x 45: the model pads the last column by reflection (its pad_mode), 17 x 23 features.
  odd = np.asarray(Image.fromarray(hazy).resize((45, 34), Image.BICUBIC)).min(-1) >= 250
  odd = np.concatenate([odd, odd[:, -2:-1]], axis=1)
  assert rows[2]["saturated"] == pytest.approx(
      odd.reshape(17, 2, 23, 2).all(axis=(1, 3)).mean())
  assert released_params.config.pad_mode == "reflect"
  for r in rows:
    assert 0 < r["rho"] < 10 and 0 <= r["mode_on_saturated"] <= 1
  for args, message in ((["--block", "4"], "--block must be from 1 to 3, got 4"),
                        (["--images", "1499_1"], "--images: no SOTS sample 1499_1"),
                        (["--scales", "2"], "--scales must be in (0, 1]"),
                        (["--crops", "15"], "--crops must be even sides >= 16")):
    stderr = _refused(script, "--modes", str(stable), "--shared", str(small), *args, code=1)
    assert message in stderr, stderr


@pytest.mark.slow
def test_stable_krylov_compares_picard_with_the_best_krylov_method(shared_dir, released_params,
                                                                    tmp_path):
  small = _small_shared(shared_dir, tmp_path / "shared")
  stable = tmp_path / "stable"
  checkpoint.save(_staged(released_params, (0.3, 0.3, 0.7)), stable)
  out = tmp_path / "krylov.json"
  script = REPO_ROOT / "benchmarks" / "stable_krylov.py"
  proc = _run(script, "--stable", str(stable), "--images", "1400_1", "--iters", "20",
              "--shared", str(small), "--out", str(out))
  report = json.loads(out.read_text())
  rows = report["rows"]
  assert [(r["image"], r["block"]) for r in rows] == [("1400_1", b) for b in (1, 2, 3)]
  # The solvers' steps are the model's own (stable_minet.py's scores on the same image).
  proc_lines = [line for line in proc.stdout.splitlines() if line.startswith("| 1400_1 |")]
  assert len(proc_lines) == 3
  for r in rows:
    assert 1 <= r["picard_steps"] <= 30 and 1 <= r["anderson_steps"] <= 30
    assert r["linearised_at_rel_residual"] <= 1e-6
    picard, krylov = np.array(r["picard_linear"]), np.array(r["krylov_best"])
    assert picard.shape == krylov.shape == (20,)
    # Picard's residual J^k r0 is one of the Krylov candidates: the best is never worse,
    # and more steps never make it worse.
    assert np.all(krylov <= picard * (1 + 1e-3) + 1e-7)
    assert np.all(np.diff(krylov) <= 1e-7) and 0 < krylov[0] <= picard[0] < 1
    for key, curve in (("picard_linear_steps", picard), ("krylov_best_steps", krylov)):
      hit = np.flatnonzero(np.concatenate([[1.0], curve]) <= r["threshold"])
      assert r[key] == (int(hit[0]) + 1 if hit.size else None)  # evaluations: updates + 1
    # Near its answer Picard is its linearisation: the estimate counts what it took.
    assert abs(r["picard_linear_steps"] - r["picard_steps"]) <= 1
    assert len(r["ritz_outer"]) == 12
    assert all(0 <= m < 10 and -180 <= a <= 180 for m, a in r["ritz_outer"])
  for args, message in ((["--images", "1499_1"], "--images: no SOTS sample 1499_1"),
                        (["--iters", "0"], "--iters must be >= 1")):
    stderr = _refused(script, "--stable", str(stable), "--shared", str(small), *args)
    assert message in stderr, stderr
  two_stage = tmp_path / "two_stage"
  checkpoint.save(_staged(released_params, (0.3, 0.5, 0.7)).replace_config(stages=(1, 2, 1)),
                  two_stage)
  stderr = _refused(script, "--stable", str(two_stage), "--shared", str(small))
  assert "--stable: the model has two-stage blocks (stages [1, 2, 1])" in stderr, stderr


@pytest.mark.slow
def test_radius_gradient_compares_each_estimates_gradient_with_d_rho(shared_dir, tmp_path):
  small = _small_shared(shared_dir, tmp_path / "shared")
  out = tmp_path / "gradient.json"
  script = REPO_ROOT / "benchmarks" / "radius_gradient.py"
  pth = str(shared_dir / "weights" / "minet_its_official.pth")
  _run(script, "--ckpt", pth, "--iters", "2", "12", "--reference", "12", "--shared", str(small),
       "--out", str(out))
  report = json.loads(out.read_text())
  assert [s["stage"] for s in report["stages"]] == [1, 2]  # block 3 as two stages
  for stage in report["stages"]:
    rows = {(r["kind"], r["iters"]): r for r in stage["rows"]}
    assert set(rows) == {(k, i) for k in ("radius", "radius_exact") for i in (2, 12)}
    # The reference is radius_exact after 12 steps: that row is it, exactly.
    same = rows[("radius_exact", 12)]
    assert same["value"] == pytest.approx(stage["reference_rho"], rel=1e-6)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert all(np.isfinite(r["value"]) and -1 <= r["cosine"] <= 1 + 1e-6 for r in rows.values())
    assert isinstance(stage["reference_found"], bool)
    # Where the projection found no eigenpair, "radius_exact" is "radius" from the same
    # start: the same value and gradient.
    for iters in (2, 12):
      exact, one_sided = rows[("radius_exact", iters)], rows[("radius", iters)]
      assert one_sided["found"]
      if not exact["found"]:
        assert exact["value"] == pytest.approx(one_sided["value"], rel=1e-5)
        assert exact["cosine"] == pytest.approx(one_sided["cosine"], abs=1e-4)
  for args, message in ((["--image", "1499_1"], "--image: no SOTS sample 1499_1"),
                        (["--block", "4"], "--block 4: the model has 3 IM-blocks"),
                        (["--iters", "0"], "must be an integer >= 1"),
                        (["--fraction", "1.5"], "--fraction / --stages")):
    stderr = _refused(script, "--ckpt", pth, "--shared", str(small), *args)
    assert message in stderr, stderr


@pytest.mark.slow
def test_synthetic_saturation_counts_saturated_pixels(shared_dir, tmp_path):
  small = _small_shared(shared_dir, tmp_path / "shared")
  hazy_path = small / "data/RESIDE/SOTS/indoor/hazy/1400_1.png"
  hazy = np.asarray(Image.open(hazy_path)).copy()
  hazy[:10, :20] = 250
  hazy[10, :20] = (250, 250, 249)  # one channel short: not saturated
  Image.fromarray(hazy).save(hazy_path)
  out = tmp_path / "saturation.json"
  _run(REPO_ROOT / "benchmarks" / "synthetic_saturation.py", "--shared", str(small),
       "--every", "100", "--exposure", "2.0", "3.0", "--out", str(out))
  report = json.loads(out.read_text())
  assert report["sots"] == {"1400_1": pytest.approx(200 / (48 * 64))}
  plain, exposed = report["synthetic"]["[1.0, 1.0]"], report["synthetic"]["[2.0, 3.0]"]
  assert plain["images"] == exposed["images"] == 6  # 204 clear images, every 100th, 2 hazes
  # The same scenes at a gain of at least 2 saturate more.
  assert exposed["max"] > plain["max"] and exposed["p90"] >= plain["p90"]


@pytest.mark.slow
def test_stable_fullres_trains_one_block_on_whole_renders(shared_dir, released_params, tmp_path):
  import jax
  import jax.numpy as jnp
  from minet_jax.core.params import model_from_params
  from minet_jax.stability import contractive
  sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
  import stable_fullres
  pth = str(shared_dir / "weights" / "minet_its_official.pth")
  out = tmp_path / "block2"
  script = REPO_ROOT / "benchmarks" / "stable_fullres.py"
  _run(script, "--init", pth, "--teacher", pth, "--block", "2", "--fraction", "0.5",
       "--target", "0.4", "--steps", "2", "--rooms", "1", "--size", "48", "64",
       "--exposure", "1", "1", "--out", str(out))
  trained = minet_jax.load(out)
  assert trained.config.stage_fraction == (1.0, 0.5, 1.0)
  assert trained.config.contractive_target[1] == 0.4
  # Only block 2's f moved.
  for name, value in trained.weights.items():
    if name != "im_blocks":
      jax.tree.map(np.testing.assert_array_equal, value, released_params.weights[name])
  for b in ("0", "2"):
    jax.tree.map(np.testing.assert_array_equal, trained.weights["im_blocks"][b],
                 released_params.weights["im_blocks"][b])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                       trained.weights["im_blocks"]["1"],
                                       released_params.weights["im_blocks"]["1"]))
  assert any(moved)
  log = json.loads(out.with_name("block2.json").read_text())
  assert [s["step"] for s in log["steps"]] == [0, 1] and log["saturated_share"] == 0.0
  # Step 0 is logged before its update: the matching term of the released block 2 at
  # fraction 0.5, from the released model's own block input and output on that render.
  hazy = stable_fullres.renders(stable_fullres.render_config(1, (48, 64), (1.0, 1.0), 7))
  hazy = hazy.astype(np.float32) / 255.0
  _, _, runs = model_from_params(released_params).forward_runs(jnp.asarray(hazy))
  student = model_from_params(released_params.replace_config(stage_fraction=(1.0, 0.5, 1.0)))
  expected = contractive.fixed_point_mismatch(student.im_blocks[1], runs[1].g0, runs[1].output)
  assert log["steps"][0]["mismatch"] == pytest.approx(float(expected[0]), rel=1e-4)
  assert 0 < log["steps"][0]["rho"] < 10
  # With --inputs, block 3's input is that model's block 2 output and its target still
  # the teacher's block 3 output.
  other = released_params.replace_config(stage_fraction=(0.5, 0.5, 1.0))
  _, records = stable_fullres.train_block(
      released_params, released_params, hazy, block=2, fraction=0.7, target=0.5, steps=1,
      learning_rate=1e-3, hinge_weight=1.0, iters=2, inputs=other, log=lambda _: None)
  g0 = model_from_params(other).forward_runs(jnp.asarray(hazy))[2][2].g0
  assert float(jnp.max(jnp.abs(g0 - runs[2].g0))) > 1e-3  # A different input indeed.
  student = model_from_params(released_params.replace_config(stage_fraction=(1.0, 1.0, 0.7)))
  expected = contractive.fixed_point_mismatch(student.im_blocks[2], g0, runs[2].output)
  assert records[0]["mismatch"] == pytest.approx(float(expected[0]), rel=1e-4)

  (tmp_path / "taken.json").write_text("kept")
  for args, message in ((["--size", "47", "64"], "--size must be even"),
                        (["--size", "8", "8"], "image_size must be"),
                        (["--fraction", "1.5"], "stage_fraction must lie in"),
                        (["--fraction", "0.005"], "stage_fraction must lie in"),
                        (["--exposure", "0.5", "1"], "exposure_range must"),
                        (["--block", "4"], "--block 4: the model has 3 IM-blocks"),
                        (["--out", str(out)], "exists"),
                        (["--out", str(tmp_path / "taken")], "taken.json exists"),
                        (["--out", str(tmp_path / "no" / "where")], "no folder")):
    base = {"--init": pth, "--teacher": pth, "--block": "2", "--fraction": "0.5",
            "--target": "0.4", "--out": str(tmp_path / "new")}
    argv = [a for k, v in base.items() if k not in args for a in (k, v)] + args
    stderr = _refused(script, *argv)
    assert message in stderr and "Traceback" not in stderr, stderr
  assert not (tmp_path / "new").exists() and (tmp_path / "taken.json").read_text() == "kept"


@pytest.mark.slow
def test_stable_two_stage_solves_both_stages_and_trains_one_block(shared_dir, released_params,
                                                                   tmp_path, monkeypatch):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from minet_jax.core.params import model_from_params
  monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
  import stable_fullres
  import stable_two_stage
  small = _small_shared(shared_dir, tmp_path / "shared")
  # The host model's block 2 is at 0.5: the script must put it at gamma.
  host = _staged(released_params, (0.3, 0.5, 0.7))
  cfg = host.config
  stable = tmp_path / "stable"
  checkpoint.save(host, stable)
  record = next(iter(folders.find_sots_pairs(small / "data/RESIDE/SOTS/indoor")))

  # The script's model: block 2 two-stage at gamma (the stages' equations: test_model.py).
  gamma = 0.3
  at_gamma = _staged(released_params, (0.3, gamma, 0.7))
  model = model_from_params(stable_two_stage.with_block(host, 1, gamma))
  assert model.config.stages == (1, 2, 1) and model.config.stage_fraction == (0.3, gamma, 0.7)
  # The one-stage comparison (--gamma < 0) is the model with block 2 at that fraction,
  # scored by stable_minet.scores.
  assert stable_two_stage.with_block(host, 1, -gamma).config == at_gamma.config
  block = model.im_blocks[1]

  script = REPO_ROOT / "benchmarks" / "stable_two_stage.py"
  pth = str(shared_dir / "weights" / "minet_its_official.pth")
  out = tmp_path / "two"
  _run(script, "--model", str(stable), "--teacher", pth, "--init-block", pth, "--gamma", "0.3",
       "--steps", "2", "--rooms", "1", "--size", "48", "64", "--shared", str(small),
       "--radius-iters", "3", "--kind", "radius_exact", "--out", str(out))
  written = out.with_name("two.json").read_text()
  result = json.loads(written)
  assert [s["step"] for s in result["training"]] == [0, 1]
  assert result["solves"] == 3 and [r["image"] for r in result["rows"]] == [record.key]
  assert len(result["rows"][0]["stage_rho"]) == 2  # One radius per stage,
  assert len(result["rows"][0]["later_rho"]) == 1  # and one for block 3.
  # Step 0 is logged before its update: the second stage's residual at the released
  # block 2's output, relative to its step, with stage 1 solved here by plain Picard.
  render = stable_fullres.renders(stable_fullres.render_config(1, (48, 64), (1.5, 3.0), 7))
  runs = nnx.jit(lambda m, x: m.solve_blocks(m.model_input(x)))(
      model_from_params(released_params), jnp.asarray(render, jnp.float32) / 255)
  g0_t, y_t = runs[1].g0, runs[1].output
  k = nnx.jit(lambda b: jax.lax.fori_loop(0, 200, lambda _, k: g0_t + gamma * cfg.eta * b.f(k),
                                          g0_t))(block)
  residual = g0_t + (1 - gamma) * cfg.eta * block.f(k) + gamma * cfg.eta * block.f(y_t) - y_t
  expected = float(jnp.sum(residual ** 2) / jnp.sum((y_t - g0_t) ** 2))
  assert result["training"][0]["mismatch"] == pytest.approx(expected, rel=2e-2)
  trained = minet_jax.load(out)
  assert trained.config.stage_fraction == (0.3, gamma, 0.7)
  assert trained.config.stages == (1, 2, 1)  # users run it as trained
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), trained.weights["im_blocks"],
                       released_params.weights["im_blocks"])
  assert any(jax.tree.leaves(moved["1"])) and not any(jax.tree.leaves(moved["0"]))
  assert not any(jax.tree.leaves(moved["2"]))
  # Bad arguments are refused before any work, in this process (as argparse exits).
  other = tmp_path / "other"
  checkpoint.save(_staged(released_params, (0.3, 0.5, 0.7), eta=0.5), other)
  for args, message in ((["--gamma=1.5"], "stage_fraction must lie in"),
                        (["--gamma=1"], "a two-stage block needs a stage_fraction below 1"),
                        (["--gamma=-0.3", "--steps=2"], "--steps must be"),
                        (["--size", "47", "64"], "--size must be even"),
                        (["--images", "9999_9"], "no SOTS sample 9999_9"),
                        (["--block=4"], "--block 4: the model has 3 IM-blocks"),
                        (["--radius-iters=-1"], "--radius-iters must be >= 0"),
                        ([f"--init-block={other}"], "--init-block has another architecture"),
                        ([f"--out={out}"], "exists")):
    given = {a.split("=")[0] for a in args if a.startswith("--")}
    base_args = {"--model": str(stable), "--init-block": pth, "--teacher": pth,
                 "--gamma": "0.3", "--steps": "0", "--shared": str(small),
                 "--out": str(tmp_path / "new")}
    argv = [f"{k}={v}" for k, v in base_args.items() if k not in given] + args
    stderr = _refused(script, *argv)
    assert message in stderr, stderr
  assert not (tmp_path / "new").exists() and not (tmp_path / "new.json").exists()
  assert out.with_name("two.json").read_text() == written
