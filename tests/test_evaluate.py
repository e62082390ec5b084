"""minet_jax.evaluation and its command line on tiny folders (and the SOTS sample, hazy rows)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import minet_jax
from minet_jax import evaluation
from minet_jax.core import fixed_point as fp
from minet_jax.core.config import ModelConfig


def _sk(out, gt):
  out, gt = out.astype(np.float64), gt.astype(np.float64)
  return (peak_signal_noise_ratio(gt, out, data_range=255),
          structural_similarity(gt, out, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, channel_axis=2, data_range=255))


@pytest.fixture(scope="module")
def sots_like(tmp_path_factory):
  """SOTS layout: two scenes, GT of scene 7 with SOTS's 10 px border, one corrupt hazy file."""
  root = tmp_path_factory.mktemp("sots")
  (root / "hazy").mkdir()
  (root / "gt").mkdir()
  rng = np.random.default_rng(0)
  truth = {}
  for scene, pad in (("7", 10), ("8", 0)):
    gt = rng.integers(0, 256, (24 + 2 * pad, 32 + 2 * pad, 3), dtype=np.uint8)
    Image.fromarray(gt).save(root / "gt" / f"{scene}.png")
    inner = gt[pad:pad + 24, pad:pad + 32]
    for k in (1, 2):
      hazy = (0.6 * inner + 0.4 * 230).astype(np.uint8)
      hazy = np.clip(hazy.astype(int) + rng.integers(-k, k + 1, hazy.shape), 0, 255)
      Image.fromarray(hazy.astype(np.uint8)).save(root / "hazy" / f"{scene}_{k}.png")
      truth[f"{scene}_{k}"] = (hazy.astype(np.uint8), inner)
  (root / "hazy" / "8_3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  return root, truth


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, random_params):
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  minet_jax.save(random_params(ModelConfig(features=4, pre_blocks=1, iterations=(1, 1, 1))), path)
  return path


def test_scores_failures_and_outputs(sots_like, tiny_ckpt, tmp_path, capsys):
  root, truth = sots_like
  before = {p: p.read_bytes() for p in root.rglob("*.png")}
  out, images = tmp_path / "res", tmp_path / "img"
  rc = evaluation.main(["--ckpt", str(tiny_ckpt), "--data", str(root), "--out", str(out),
                          "--save-images", str(images), "--no-progress"])
  captured = capsys.readouterr()
  assert rc == 1  # one image failed ...
  assert "8_3" in captured.err and "8_3" in captured.out
  for name in ("MI-Net", "hazy input", "DCP"):  # ... the rest were scored
    assert name in captured.out
  result = json.loads((out / "results.json").read_text())
  assert set(result["failed_images"]) == {"8_3"}
  rows = list(csv.DictReader(open(out / "per_image.csv")))
  assert len(rows) == 5 * 3
  hazy_rows = {r["image"]: r for r in rows if r["method"] == "hazy" and not r["error"]}
  assert set(hazy_rows) == set(truth)
  for key, (hazy, gt) in truth.items():
    p, s = _sk(hazy, gt)
    assert float(hazy_rows[key]["psnr"]) == pytest.approx(p, abs=1e-3)
    assert float(hazy_rows[key]["ssim"]) == pytest.approx(s, abs=1e-4)
  summary = result["summary"]
  assert summary["hazy"]["images"] == 4 and summary["hazy"]["failed"] == 1
  assert summary["hazy"]["psnr"] == pytest.approx(
      np.mean([float(r["psnr"]) for r in hazy_rows.values()]), abs=1e-3)
  # Saved outputs: the MI-Net PNG scores what the table says it scored (up to 8-bit rounding).
  saved = np.asarray(Image.open(images / "minet" / "7_1.png"))
  minet_row = next(r for r in rows if r["method"] == "minet" and r["image"] == "7_1")
  assert _sk(saved, truth["7_1"][1])[0] == pytest.approx(float(minet_row["psnr"]), abs=0.1)
  assert sorted(p.name for p in (images / "hazy").iterdir()) == [f"{k}.png" for k in sorted(truth)]
  assert {p: p.read_bytes() for p in root.rglob("*.png")} == before


def test_limit_methods_and_errors(sots_like, capsys):
  root, _ = sots_like
  report = evaluation.evaluate(None, root, methods=["hazy"], limit=2, progress=False)
  assert [r.key for r in report.rows] == ["7_1", "7_2"]
  assert "hazy input" in report.table()
  assert "note" not in capsys.readouterr().err
  with pytest.raises(ValueError, match="--ckpt its"):
    evaluation.evaluate(None, root, methods=["minet"], progress=False)
  # Model options without the model: noted, not dropped in silence.
  evaluation.evaluate("nowhere", root, methods=["hazy"], limit=1, progress=False,
                      config_changes={"iterations": 3})
  assert "apply to method 'minet' only, not to hazy" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown method"):
    evaluation.evaluate(None, root, methods=["cap"], progress=False)
  assert evaluation.main(["--data", str(root / "nowhere"), "--methods", "hazy"]) == 2


def test_an_unwritable_or_taken_out_folder_is_refused_before_any_work(sots_like, tmp_path,
                                                                       monkeypatch, capsys):
  root, truth = sots_like
  scored = []
  real_scores = evaluation.metrics.dehazing_scores
  monkeypatch.setattr(evaluation.metrics, "dehazing_scores",
                      lambda *a: scored.append(1) or real_scores(*a))
  afile = tmp_path / "afile"
  afile.write_text("keep")
  hazy = ["--data", str(root), "--methods", "hazy", "--no-progress"]
  for args, message in ((["--out", str(afile)], "is a file, not a folder"),
                        (["--out", str(afile / "sub")], "cannot be created"),
                        (["--save-images", str(afile)], "--save-images .* is a file")):
    assert evaluation.main(hazy + args) == 2
    assert re.search(message, capsys.readouterr().err)
  assert not scored and afile.read_text() == "keep"
  # A folder that already holds a report keeps it unless --overwrite is given.
  out = tmp_path / "res"
  assert evaluation.main(hazy + ["--out", str(out)]) == 1  # 8_3 is broken
  first = (out / "results.json").read_bytes()
  scored.clear()
  assert evaluation.main(hazy + ["--out", str(out), "--limit", "1"]) == 2
  assert "already holds per_image.csv, results.json" in capsys.readouterr().err
  assert not scored and (out / "results.json").read_bytes() == first
  assert evaluation.main(hazy + ["--out", str(out), "--limit", "1", "--overwrite"]) == 0
  assert len(json.loads((out / "results.json").read_text())["per_image"]) == 1
  # Saved images already there are kept unless --overwrite is given.
  images = tmp_path / "img"
  (images / "hazy").mkdir(parents=True)
  (images / "hazy" / "7_2.png").write_bytes(b"an earlier result")
  scored.clear()
  assert evaluation.main(hazy + ["--save-images", str(images), "--limit", "2"]) == 2
  assert "--save-images" in capsys.readouterr().err and not scored
  assert (images / "hazy" / "7_2.png").read_bytes() == b"an earlier result"
  # A folder where an output would go is refused up front, even with --overwrite.
  (images / "hazy" / "7_1.png").mkdir()
  with pytest.raises(ValueError, match="holds a folder named hazy/7_1.png"):
    evaluation.evaluate(None, root, methods=["hazy"], limit=2, save_images=images,
                        progress=False, overwrite=True)
  (images / "hazy" / "7_1.png").rmdir()
  # An image that cannot be saved is one failed row, not a scored row and a failed one,
  # and the table's last line names it as failed.
  real_write = evaluation.image_io.write_png

  def full_disk_at_7_1(path, *args, **kwargs):
    if path.name == "7_1.png":
      raise OSError(28, "No space left on device")
    return real_write(path, *args, **kwargs)

  monkeypatch.setattr(evaluation.image_io, "write_png", full_disk_at_7_1)
  report = evaluation.evaluate(None, root, methods=["hazy"], limit=2, save_images=images,
                               progress=False, overwrite=True)
  assert [(r.key, bool(r.error)) for r in report.rows] == [("7_1", True), ("7_2", False)]
  assert report.table().splitlines()[-1] == "1 image(s) failed: 7_1"
  failed = report.to_json()["failed_images"]
  assert list(failed) == ["7_1"] and failed["7_1"].startswith("hazy: ")
  assert Image.open(images / "hazy" / "7_2.png").size == (truth["7_2"][0].shape[1],
                                                          truth["7_2"][0].shape[0])
  # Nor may the images go into the data folder, where the next run would read them.
  scored.clear()
  for inside in (root, root / "results"):
    assert evaluation.main(hazy + ["--save-images", str(inside)]) == 2
    assert "lies inside the data folder" in capsys.readouterr().err
  assert not (root / "results").exists() and not scored


def test_real_sots_hazy_rows_match_published(shared_dir):
  scores = json.loads((shared_dir / "parity" / "official_scores.json").read_text())
  report = evaluation.evaluate(None, shared_dir / "data" / "RESIDE" / "SOTS" / "indoor",
                               methods=["hazy"], progress=False)
  assert len(report.rows) == 10 and not report.failed
  for r in report.rows:
    want_p, want_s = scores["per_image"][f"{r.key}.png"]["hazy_input"]
    assert r.psnr == pytest.approx(want_p, abs=1e-3) and r.ssim == pytest.approx(want_s, abs=1e-5)
  mean_p, mean_s = scores["mean"]["hazy_input"]
  assert report.summary()["hazy"]["psnr"] == pytest.approx(mean_p, abs=1e-3)
  assert report.summary()["hazy"]["ssim"] == pytest.approx(mean_s, abs=1e-5)


def test_negative_and_zero_limits_are_refused(sots_like, capsys):
  root, _ = sots_like
  args = ["--data", str(root), "--methods", "hazy", "--no-progress", "--limit"]
  assert evaluation.main(args + ["-1"]) == 2  # not "all but the last image"
  assert "--limit must be >= 0, got -1" in capsys.readouterr().err
  assert evaluation.main(args + ["0"]) == 2
  assert "no image pairs found" in capsys.readouterr().err


def test_config_changes_score_the_faster_model(sots_like, tiny_ckpt):
  root, _ = sots_like
  rows = {}
  for name, changes in (("exact", None), ("bf16", {"dtype": "bfloat16"})):
    report = evaluation.evaluate(tiny_ckpt, root, methods=["minet"], limit=2,
                                 config_changes=changes, progress=False)
    rows[name] = [r.psnr for r in report.rows]
    assert report.to_json()["minet_settings"] == ({"dtype": "bfloat16"} if changes else {})
    assert ("MI-Net inexact: dtype=bfloat16" in report.table()) == bool(changes)
  # The same images scored, nearly the same, not identically (a different computation).
  assert rows["exact"] != rows["bf16"]
  np.testing.assert_allclose(rows["exact"], rows["bf16"], atol=0.5)
  with pytest.raises(ValueError, match="dtype must be one of"):
    evaluation.evaluate(tiny_ckpt, root, methods=["minet"], limit=1,
                        config_changes={"dtype": "int8"}, progress=False)


def test_non_finite_outputs_fail_the_run(sots_like, monkeypatch, capsys):
  # A NaN output used to be scored PSNR nan and the run exited 0.
  root, _ = sots_like
  monkeypatch.setattr(evaluation, "build_methods",
                      lambda methods, *a, **k: {"hazy": lambda x: x * np.nan})
  rc = evaluation.main(["--data", str(root), "--methods", "hazy", "--limit", "2",
                        "--no-progress"])
  captured = capsys.readouterr()
  assert rc == 1
  assert "hazy failed on 7_1: FloatingPointError: the output holds 100% NaN" in captured.err
  assert "(2 failed)" in captured.out


def test_bfloat16_at_precision_default_is_scored(sots_like, tiny_ckpt):
  # It used to fail every image on CPUs with AVX512-BF16 or AMX.
  root, _ = sots_like
  report = evaluation.evaluate(tiny_ckpt, root, methods=["minet"], limit=2, progress=False,
                               config_changes={"dtype": "bfloat16", "precision": "default"})
  assert [r.error for r in report.rows] == ["", ""]
  assert report.settings == {"dtype": "bfloat16", "precision": "default"}


def test_float16_and_no_methods_are_refused(sots_like, tiny_ckpt, capsys):
  root, _ = sots_like
  assert evaluation.main(["--ckpt", str(tiny_ckpt), "--data", str(root), "--methods", "minet",
                          "--dtype", "float16", "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "dtype 'float16' is not supported" in err and err.count("\n") == 1
  assert evaluation.main(["--data", str(root), "--methods", "", "--no-progress"]) == 2
  captured = capsys.readouterr()
  assert "no method to evaluate; choose from minet,hazy,dcp" in captured.err
  assert captured.out == ""


@pytest.fixture(scope="module")
def picard_ckpt(tmp_path_factory, random_params):
  path = tmp_path_factory.mktemp("ckpt") / "picard"
  minet_jax.save(random_params(ModelConfig(features=4, pre_blocks=1, iterations=(30, 30, 30),
                                           solver="picard", rtol=1e-3)), path)
  return path


def test_solved_models_report_each_images_solves(sots_like, picard_ckpt, tiny_ckpt, tmp_path,
                                                 capsys):
  root, truth = sots_like
  out = tmp_path / "res"
  report = evaluation.evaluate(picard_ckpt, root, methods=["minet"], out_dir=out, progress=False)
  params = minet_jax.load(picard_ckpt)
  rows = [r for r in report.rows if not r.error]
  assert len(rows) == 4
  for r in rows:  # what `minet_jax.apply` reports for the same image
    solves: list = []
    minet_jax.apply(params, truth[r.key][0], solves=solves)
    assert r.solve_steps == tuple(int(s.num_steps[0]) for s in solves)
    assert r.solve_converged == tuple(
        bool(s.status[0] == fp.RESULTS.successful) for s in solves)
    # (Compiled apart, the two programs may round differently.)
    np.testing.assert_allclose(r.solve_residual, [float(s.residual[0]) for s in solves],
                               rtol=1e-3)
    assert all(r.solve_converged) and max(r.solve_residual) <= 1e-3
  summary = report.summary()["minet"]
  assert summary["solves"] == 12 and summary["solves_converged"] == 12
  np.testing.assert_allclose(summary["mean_steps_per_block"],
                             np.mean([r.solve_steps for r in rows], axis=0))
  assert "picard to rtol 0.001: 12/12 solves converged" in report.table()
  result = json.loads((out / "results.json").read_text())
  assert result["minet_solve"] == {"solver": "picard", "rtol": 1e-3, "atol": 0.0,
                                   "max_steps": [30, 30, 30], "stages": [1, 1, 1]}
  csv_rows = {r["image"]: r for r in csv.DictReader(open(out / "per_image.csv"))}
  assert csv_rows["7_1"]["solve_steps"] == " ".join(map(str, rows[0].solve_steps))
  assert csv_rows["7_1"]["solve_converged"] == "true true true"
  assert csv_rows["8_3"]["solve_steps"] == ""  # the unreadable pair
  capsys.readouterr()
  # One map evaluation allowed and an unreachable tolerance: every solve stops at the
  # cap, unconverged, and each image says so where the user sees it.
  report = evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=2, progress=False,
                               config_changes={"iterations": 1, "rtol": 1e-30})
  assert [r.solve_steps for r in report.rows] == [(1, 1, 1)] * 2
  assert [r.solve_converged for r in report.rows] == [(False, False, False)] * 2
  assert "0/6 solves converged, mean steps per block 1.0 / 1.0 / 1.0" in report.table()
  # A two-stage block: its steps summed, and each stage's beside them.
  two = evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=1, progress=False,
                            out_dir=tmp_path / "two", config_changes={
                                "iterations": 1, "rtol": 1e-30, "stages": (1, 2, 1),
                                "stage_fraction": (1.0, 0.5, 1.0)})
  assert two.rows[0].solve_steps == (1, 2, 1)
  assert two.rows[0].solve_stage_steps == ((1,), (1, 1), (1,))
  csv_two = next(csv.DictReader(open(tmp_path / "two" / "per_image.csv")))
  assert (csv_two["solve_steps"], csv_two["solve_stage_steps"]) == ("1 2 1", "1 1+1 1")
  err = capsys.readouterr().err
  assert "evaluate: minet on 7_1: IM-blocks picard to rtol 1e-30: 1 / 1 / 1 steps, block 1 " \
         "max_steps_reached" in err and "7_2" in err
  # Unrolled (the released model's way): fixed steps, nothing to report, and a tolerance
  # given for it is noted as having no effect.
  capsys.readouterr()
  report = evaluation.evaluate(tiny_ckpt, root, methods=["minet"], limit=1, progress=False,
                               config_changes={"rtol": 1e-6})
  assert report.rows[0].solve_steps == () and "solves converged" not in report.table()
  assert "evaluate: note: --rtol has no effect: the IM-blocks run unrolled" in \
      capsys.readouterr().err
  assert report.to_json()["minet_solve"] == {"solver": "unrolled", "max_steps": [1, 1, 1],
                                              "stages": [1, 1, 1]}
  # A setting that will run badly: a Python warning from the library, a note of the tool's
  # from the command line.
  capsys.readouterr()
  with pytest.warns(UserWarning, match="with dtype 'bfloat16'"):
    evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=1, progress=False,
                        config_changes={"dtype": "bfloat16", "iterations": 1})
  evaluation.main(["--ckpt", str(picard_ckpt), "--data", str(root), "--methods", "minet",
                   "--limit", "1", "--dtype", "bfloat16", "--max-steps", "1", "--no-progress"])
  err = capsys.readouterr().err
  assert "evaluate: note: solver 'picard' at rtol 0.001 with dtype 'bfloat16'" in err, err
  assert "Warning" not in err


def test_a_failed_image_keeps_its_solves(sots_like, picard_ckpt, monkeypatch, capsys):
  # An image that fails after its solves (here its scoring) still records them, and the
  # summary counts them: a failed solve may be why an image failed.
  root, _ = sots_like
  scores, calls = evaluation.metrics.dehazing_scores, []

  def fail_the_second(out, clear):  # 7_1, then 7_2
    calls.append(1)
    if len(calls) == 2:
      raise FloatingPointError("no score")
    return scores(out, clear)
  monkeypatch.setattr(evaluation.metrics, "dehazing_scores", fail_the_second)
  report = evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=2, progress=False,
                               config_changes={"iterations": 2, "rtol": 1e-30})
  failed = [r for r in report.rows if r.error]
  assert [r.key for r in failed] == ["7_2"] and "no score" in failed[0].error
  assert failed[0].solve_steps == (2, 2, 2) and failed[0].solve_converged == (False,) * 3
  summary = report.summary()["minet"]
  assert (summary["images"], summary["failed"], summary["solves"]) == (1, 1, 6)
  assert "0/6 solves converged" in report.table()
  assert "minet on 7_2: IM-blocks picard to rtol 1e-30: 2 / 2 / 2 steps" in \
      capsys.readouterr().err


def test_images_above_the_strip_threshold_run_in_strips_as_apply_does(sots_like, picard_ckpt,
                                                                      monkeypatch):
  # A 20 MP photo's whole-image program needs about 30 GB: above 2 MP, evaluate runs
  # MI-Net in strips as minet_jax.apply does. Here the threshold is lowered below 24x32.
  from minet_jax.core import strips
  root, _ = sots_like
  whole = evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=2, progress=False)
  monkeypatch.setattr(strips, "AUTO_PIXELS", 500)
  monkeypatch.setattr(strips, "STRIP_PIXELS", 300)
  assert strips.choose_strip_rows(24, 32) < 24  # Several strips.
  in_strips = evaluation.evaluate(picard_ckpt, root, methods=["minet"], limit=2,
                                  progress=False)
  assert in_strips.compile_seconds["minet"] == 0.0  # No whole-image program compiled.
  for a, b in zip(whole.rows, in_strips.rows):
    assert not a.error and not b.error
    assert b.psnr == pytest.approx(a.psnr, abs=1e-3) and b.ssim == pytest.approx(a.ssim, abs=1e-5)
    assert b.solve_steps and len(b.solve_converged) == 3


def test_ctrl_c_reports_the_images_scored_before_it(tmp_path, monkeypatch, capsys):
  # Ctrl-C used to end in a traceback with nothing written. File names that are not
  # UTF-8 are written back as their bytes (the report used to fail after all the work).
  data = tmp_path / "pairs"
  rng = np.random.default_rng(1)
  for stem in ("a", "b", "c", "caf\udce9"):  # The last: the byte 0xe9 in the name.
    for sub, tag in (("hazy", "_hazy"), ("gt", "_GT")):
      (data / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
          data / sub / f"{stem}{tag}.png")
  out = tmp_path / "out"
  assert evaluation.main(["--data", str(data), "--methods", "hazy,dcp", "--out", str(out),
                          "--no-progress"]) == 0
  assert b"caf\xe9_hazy" in (out / "per_image.csv").read_bytes()
  capsys.readouterr()
  calls = []
  scores = evaluation.metrics.dehazing_scores

  def interrupted_at_the_second_images_dcp(*args):
    calls.append(args)
    if len(calls) == 4:  # a: hazy, dcp; b: hazy (saved), then dcp.
      raise KeyboardInterrupt
    return scores(*args)

  monkeypatch.setattr(evaluation.metrics, "dehazing_scores", interrupted_at_the_second_images_dcp)
  images = tmp_path / "images"
  rc = evaluation.main(["--data", str(data), "--methods", "hazy,dcp", "--out", str(out),
                        "--overwrite", "--save-images", str(images), "--no-progress"])
  captured = capsys.readouterr()
  assert rc == 130
  assert "interrupted after 1 of 4 images; the report of those is in" in captured.err
  assert "(interrupted: 1 of 4 images evaluated)" in captured.out
  result = json.loads((out / "results.json").read_text())
  assert result["interrupted"] == {"evaluated": 1, "found": 4}
  assert result["summary"]["hazy"]["images"] == result["summary"]["dcp"]["images"] == 1
  # What it saved of the image it stopped in is gone with its rows.
  assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")) == [
      "dcp/a_hazy.png", "hazy/a_hazy.png"]
  rows = list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))
  assert [(r["image"], r["method"]) for r in rows] == [
      (k, m) for k in ("a_hazy",) for m in ("hazy", "dcp")]
