"""python -m minet_jax.dehaze: odd inputs, corrupt files, never overwriting; tiling."""

from __future__ import annotations

import struct
import sys
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

import minet_jax
from minet_jax import dehaze, metrics, tiling
from minet_jax.core.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, random_params):
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  minet_jax.save(random_params(ModelConfig(features=4, pre_blocks=1, iterations=(1, 1, 1))), path)
  return path


def _png16_rgb(path, a):
  raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

  ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                   chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture()
def photo_folder(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / "photos"
  d.mkdir()
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / "a.png")
  Image.fromarray(rng.integers(0, 256, (17, 23), dtype=np.uint8), "L").save(d / "gray.jpg")
  Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
  _png16_rgb(d / "deep.png", rng.integers(0, 65536, (12, 18, 3), dtype=np.uint16))
  im = Image.fromarray(rng.integers(0, 256, (10, 26, 3), dtype=np.uint8))
  exif = im.getexif()
  exif[0x0112] = 8  # displayed rotated: stored 10x26 shows as 26x10
  im.save(d / "turned.jpg", exif=exif)
  (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not really")
  (d / "notes.txt").write_text("ignored: not an image suffix")
  return d


def test_folder_with_a_corrupt_file(photo_folder, tiny_ckpt, tmp_path, capsys):
  before = {p.name: p.read_bytes() for p in photo_folder.iterdir()}
  out = tmp_path / "out"
  rc = dehaze.main(["--ckpt", str(tiny_ckpt), str(photo_folder), "-o", str(out),
                    "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 1
  assert "broken.png" in err and "a.png" not in err
  shapes = {p.name: np.asarray(Image.open(p)).shape for p in out.iterdir()}
  assert shapes == {"a_dehazed.png": (20, 30, 3), "gray_dehazed.png": (17, 23, 3),
                    "rgba_dehazed.png": (16, 16, 3), "deep_dehazed.png": (12, 18, 3),
                    "turned_dehazed.png": (26, 10, 3)}
  assert {p.name: p.read_bytes() for p in photo_folder.iterdir()} == before


def test_output_into_the_input_folder_never_overwrites(photo_folder, tiny_ckpt, capsys):
  (photo_folder / "broken.png").unlink()
  before = {p.name: p.read_bytes() for p in photo_folder.iterdir()}
  # Same folder, empty suffix: every output name is an input name -> all refused.
  rc = dehaze.main(["--ckpt", str(tiny_ckpt), str(photo_folder / "a.png"), "-o",
                    str(photo_folder), "--suffix", "", "--no-progress"])
  assert rc == 1 and "would overwrite an input" in capsys.readouterr().err
  assert {p.name: p.read_bytes() for p in photo_folder.iterdir()} == before
  # Default suffix: results land beside the inputs, which stay untouched.
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo_folder / "a.png"), "-o",
                      str(photo_folder), "--no-progress"]) == 0
  assert (photo_folder / "a_dehazed.png").is_file()
  assert all((photo_folder / n).read_bytes() == b for n, b in before.items())


def test_missing_inputs_and_bad_flags(tiny_ckpt, tmp_path, capsys):
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(tmp_path / "nope.png"), "-o",
                      str(tmp_path / "o"), "--no-progress"]) == 1
  assert "nope.png" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    dehaze.main(["--ckpt", str(tiny_ckpt), "x.png", "-o", "o", "--tile", "16",
                 "--overlap", "16"])
  assert dehaze.main(["--ckpt", str(tmp_path / "no_ckpt"), "x.png", "-o", "o"]) == 2


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_tiling_reconstructs_pointwise_functions(blend):
  rng = np.random.default_rng(3)
  img = rng.uniform(size=(45, 70, 3)).astype(np.float32)
  calls = []

  def fn(x):
    calls.append(x.shape)
    return np.sqrt(x)

  out = tiling.tiled_apply(fn, img, tile=16, overlap=5, blend=blend)
  np.testing.assert_allclose(out, np.sqrt(img), rtol=1e-6)
  assert len(set(calls)) == 1  # one tile shape -> one compilation


def test_tile_layout_and_windows():
  for size, tile, overlap in [(100, 32, 8), (33, 32, 8), (32, 32, 0), (1000, 256, 64)]:
    starts = tiling.tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
  w = tiling.blend_window(8, 8, top=True, bottom=False, left=False, right=True, overlap=4)
  assert w.min() > 0 and w[-1, 0] == 1.0 and w[0, 0] < 0.1 and w[-1, -1] < 0.1
  with pytest.raises(ValueError, match="overlap"):
    tiling.tile_starts(100, 16, 16)


def test_tiled_model_close_to_whole_image(tiny_ckpt, tmp_path):
  params = minet_jax.load(tiny_ckpt)
  rng = np.random.default_rng(4)
  y, x = np.mgrid[0:40, 0:56] / 56.0
  img = np.clip(np.stack([0.5 + 0.3 * x, 0.6 - 0.2 * y, 0.4 + 0.1 * x * y], -1) +
                0.05 * rng.standard_normal((40, 56, 3)), 0, 1).astype(np.float32)
  whole = dehaze.dehaze_image(params, img)
  tiled = dehaze.dehaze_image(params, img, tile=32, overlap=12)
  assert tiled.shape == whole.shape and np.all(np.isfinite(tiled))
  assert tiled.min() >= 0 and tiled.max() <= 1
  assert float(metrics.psnr(tiled, whole, data_range=1.0)) > 15.0


# ------------------------------------------------------------------ users' files and -o


def _png(path, seed=0):
  """A small random image (PNG, or JPEG by the suffix)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(
      path)
  return path


def _snapshot(root):
  return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_existing_file_of_the_output_name_is_never_replaced(tiny_ckpt, tmp_path, capsys):
  # photo.jpg -> photo.png with an empty suffix: the user's own photo.png must survive.
  folder = tmp_path / "photos"
  _png(folder / "photo.png", seed=1)
  _png(folder / "photo.jpg", seed=2)
  before = _snapshot(folder)
  rc = dehaze.main(["--ckpt", str(tiny_ckpt), str(folder / "photo.jpg"), "-o", str(folder),
                    "--suffix", "", "--no-progress"])
  assert rc == 1
  assert "photo.png already exists" in capsys.readouterr().err
  assert _snapshot(folder) == before


def test_suffix_cannot_write_outside_the_output_folder(tiny_ckpt, tmp_path, capsys):
  _png(tmp_path / "in" / "a.png")
  before = _snapshot(tmp_path)
  with pytest.raises(SystemExit):
    dehaze.main(["--ckpt", str(tiny_ckpt), str(tmp_path / "in" / "a.png"), "-o",
                 str(tmp_path / "o" / "deep"), "--suffix", "/../../x", "--no-progress"])
  assert "no path separators" in capsys.readouterr().err
  assert _snapshot(tmp_path) == before
  with pytest.raises(ValueError, match="no path separators"):
    dehaze.plan([tmp_path / "in"], tmp_path / "o", suffix="/../x")



def test_a_file_named_twice_is_processed_once(tmp_path):
  _png(tmp_path / "in" / "a.png", 1)
  _png(tmp_path / "in" / "sub" / "b.png", 2)
  folder = tmp_path / "in" / "sub" / ".."  # The same folder under another name.
  inputs = [tmp_path / "in" / "a.png", folder, tmp_path / "in" / "a.png"]
  jobs, failed, skipped = dehaze.plan(inputs, tmp_path / "out", recursive=True)
  assert failed == {}
  assert [j.source for j in jobs] == [tmp_path / "in" / "a.png", folder / "sub" / "b.png"]
  assert skipped == {str(folder / "a.png"):
                     f"the same file as {tmp_path / 'in' / 'a.png'}: processed once"}



def test_a_non_finite_output_is_a_failure_and_writes_nothing(tiny_ckpt, tmp_path):
  params = minet_jax.load(tiny_ckpt)
  weights = jax.tree.map(np.array, params.weights)
  weights["deconv1"]["bias"][0] = np.nan  # As after a diverged training run.
  broken = minet_jax.Params(weights=weights, config=params.config)
  _png(tmp_path / "in" / "a.png")
  outcome = dehaze.dehaze_files(broken, [tmp_path / "in"], tmp_path / "out", progress=False)
  assert outcome.written == [] and not (tmp_path / "out").exists()
  assert "NaN or infinite values" in outcome.failed[str(tmp_path / "in" / "a.png")]


def test_output_folder_inside_the_input_folder_is_reported(tiny_ckpt, tmp_path, capsys):
  photos = tmp_path / "photos"
  _png(photos / "a.png", 1)
  _png(photos / "sub" / "b.png", 2)
  _png(photos / "out" / "real.png", 3)        # the user's image inside the chosen -o
  _png(photos / "old" / "a_dehazed.png", 4)   # a result of an earlier run
  (photos / "sub" / "gone.png").symlink_to(tmp_path / "moved.png")  # a link to nothing
  rc = dehaze.main(["--ckpt", str(tiny_ckpt), str(photos), "-o", str(photos / "out"),
                    "--recursive", "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 1  # real.png was not processed, and that is an error
  assert f"skipped: {photos / 'old' / 'a_dehazed.png'}: named like an earlier result" in err
  assert f"failed: {photos / 'out' / 'real.png'}: not processed: it lies inside the output" in err
  assert f"failed: {photos / 'sub' / 'gone.png'}: " in err
  assert (photos / "out" / "a_dehazed.png").is_file()
  assert (photos / "out" / "sub" / "b_dehazed.png").is_file()
  assert not list(photos.rglob("*_dehazed_dehazed.png"))


def test_output_folder_equal_to_the_input_folder(tiny_ckpt, tmp_path, capsys):
  photos = tmp_path / "photos"
  _png(photos / "a.png", 1)
  _png(photos / "b.png", 2)
  args = ["--ckpt", str(tiny_ckpt), str(photos), "-o", str(photos), "--no-progress"]
  assert dehaze.main(args) == 0
  assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_dehazed.png", "b.png",
                                                      "b_dehazed.png"]
  capsys.readouterr()
  before = _snapshot(photos)
  assert dehaze.main(args) == 1  # a second run replaces nothing and says why
  err = capsys.readouterr().err
  assert "a_dehazed.png: named like an earlier result" in err
  assert "a_dehazed.png already exists" in err
  assert _snapshot(photos) == before


def test_strip_rows_flag_matches_the_whole_image(tiny_ckpt, tmp_path):
  rng = np.random.default_rng(5)
  src = tmp_path / "photo.png"
  Image.fromarray(rng.integers(0, 256, (41, 56, 3), dtype=np.uint8)).save(src)
  outs = {}
  for rows in ("0", "8"):
    out = tmp_path / f"rows{rows}"
    assert dehaze.main(["--ckpt", str(tiny_ckpt), str(src), "-o", str(out), "--no-progress",
                        "--strip-rows", rows]) == 0
    outs[rows] = np.asarray(Image.open(out / "photo_dehazed.png")).astype(int)
  # Equal up to float32 rounding, so 8-bit values differ by at most one level.
  assert np.abs(outs["0"] - outs["8"]).max() <= 1
  with pytest.raises(SystemExit):
    dehaze.main(["--ckpt", str(tiny_ckpt), str(src), "-o", "o", "--strip-rows", "-1"])


def test_speed_flags_run_the_model_inexactly(tiny_ckpt, tmp_path):
  rng = np.random.default_rng(6)
  src = tmp_path / "photo.png"
  Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src)
  outs = {}
  for name, flags in (("exact", []), ("bf16", ["--dtype", "bfloat16"]),
                      ("default", ["--precision", "default"])):
    out = tmp_path / name
    assert dehaze.main(["--ckpt", str(tiny_ckpt), str(src), "-o", str(out), "--no-progress",
                        *flags]) == 0
    outs[name] = np.asarray(Image.open(out / "photo_dehazed.png")).astype(int)
  # bfloat16 features: close (8 bits of mantissa), and not the float32 image itself.
  diff = np.abs(outs["exact"] - outs["bf16"])
  assert 0 < diff.max() and diff.mean() < 4
  # bfloat16 products (only where the CPU has them; float32 elsewhere): closer still.
  assert np.abs(outs["exact"] - outs["default"]).mean() < 1
  for bad in (["--dtype", "int8"], ["--precision", "low"]):
    with pytest.raises(SystemExit):
      dehaze.main(["--ckpt", str(tiny_ckpt), str(src), "-o", "o", *bad])


def _photo(folder, name="a.png", gray=False, size=(20, 30)):
  rng = np.random.default_rng(1)
  folder.mkdir(parents=True, exist_ok=True)
  shape = size if gray else (*size, 3)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
  return folder / name


def test_overwrite_is_explicit_and_never_touches_inputs(tiny_ckpt, tmp_path, capsys):
  photo = _photo(tmp_path / "in")
  out = tmp_path / "out"
  args = ["--ckpt", str(tiny_ckpt), str(photo), "-o", str(out), "--no-progress"]
  assert dehaze.main(args) == 0
  result = out / "a_dehazed.png"
  first = result.read_bytes()
  result.write_bytes(b"stale")
  capsys.readouterr()
  assert dehaze.main(args) == 1
  assert "already exists; dehaze replaces files only with --overwrite" in capsys.readouterr().err
  assert result.read_bytes() == b"stale"
  assert dehaze.main([*args, "--overwrite"]) == 0
  assert result.read_bytes() == first
  before = photo.read_bytes()
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", str(photo.parent),
                      "--suffix", "", "--overwrite", "--no-progress"]) == 1
  assert "would overwrite an input" in capsys.readouterr().err
  assert photo.read_bytes() == before


def test_format_jpg_and_its_results_are_skipped_as_earlier_results(tiny_ckpt, tmp_path, capsys):
  photo = _photo(tmp_path / "in")
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo.parent), "-o", str(photo.parent),
                      "--format", "jpg", "--compare", "--no-progress"]) == 0
  with Image.open(photo.parent / "a_dehazed.jpg") as im:
    assert im.format == "JPEG" and im.size == (30, 20)
  assert (photo.parent / "a_dehazed_compare.jpg").is_file()
  capsys.readouterr()
  # Rerun over the folder: the two results are earlier results, not new inputs.
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo.parent), "-o", str(photo.parent),
                      "--format", "jpg", "--no-progress"]) == 1  # a.png's result exists
  err = capsys.readouterr().err
  assert err.count("named like an earlier result") == 2
  with pytest.raises(SystemExit):
    dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", "o", "--format", "gif"])


def test_compare_puts_input_and_result_side_by_side(tiny_ckpt, tmp_path):
  photo = _photo(tmp_path / "in")
  out = tmp_path / "out"
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", str(out), "--compare",
                      "--no-progress"]) == 0
  both = np.asarray(Image.open(out / "a_dehazed_compare.png"))
  assert both.shape == (20, 30 + 8 + 30, 3)
  np.testing.assert_array_equal(both[:, :30], np.asarray(Image.open(photo)))
  assert (both[:, 30:38] == 255).all()
  np.testing.assert_array_equal(both[:, 38:], np.asarray(Image.open(out / "a_dehazed.png")))


def test_keep_gray_writes_the_luminance_for_gray_inputs_only(tiny_ckpt, tmp_path):
  gray = _photo(tmp_path / "in", "g.png", gray=True)
  colour = _photo(tmp_path / "in", "c.png")
  plain, kept = tmp_path / "plain", tmp_path / "kept"
  for out, extra in ((plain, []), (kept, ["--keep-gray", "--compare"])):
    assert dehaze.main(["--ckpt", str(tiny_ckpt), str(gray), str(colour), "-o", str(out),
                        "--no-progress", *extra]) == 0
  rgb = np.asarray(Image.open(plain / "g_dehazed.png")).astype(np.float64)
  assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0  # the model's output is tinted
  one = np.asarray(Image.open(kept / "g_dehazed.png"))
  assert one.ndim == 2
  # Pillow's own RGB -> L conversion of the colour result, within rounding.
  want = np.asarray(Image.open(plain / "g_dehazed.png").convert("L")).astype(int)
  assert np.abs(one.astype(int) - want).max() <= 1
  assert np.asarray(Image.open(kept / "g_dehazed_compare.png")).shape == (20, 68)
  np.testing.assert_array_equal(np.asarray(Image.open(kept / "c_dehazed.png")),
                                np.asarray(Image.open(plain / "c_dehazed.png")))


def test_tile_without_overlap_uses_a_fitting_overlap(tiny_ckpt, tmp_path, capsys):
  photo = _photo(tmp_path / "in", size=(40, 40))
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", str(tmp_path / "o"),
                      "--tile", "16", "--no-progress"]) == 0
  for flags, message in ((["--tile", "16", "--overlap", "16"],
                          "--overlap 16 must be smaller than --tile 16"),
                         (["--tile", "-1"], "--tile must be >= 0, got -1"),
                         (["--overlap", "-2"], "--overlap must be >= 0, got -2")):
    with pytest.raises(SystemExit):
      dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", "o", *flags])
    assert message in capsys.readouterr().err
  assert dehaze.default_overlap(16) == 4 and dehaze.default_overlap(512) == 32


def test_help_names_the_program_and_shows_defaults(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["/venv/bin/minet-dehaze"])
  with pytest.raises(SystemExit) as exited:
    dehaze.main(["--help"])
  assert exited.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert text.startswith("usage: minet-dehaze ")
  assert "(default: 0, the whole image at once)" in text
  assert "(default: 32, or a quarter of --tile when that is less)" in text
  monkeypatch.setattr(sys, "argv", ["/src/minet_jax/dehaze.py"])
  assert dehaze.parser().prog == "python -m minet_jax.dehaze"


def test_a_workdirs_checkpoint_folder_asks_for_the_workdir(tiny_ckpt, tmp_path, capsys):
  workdir = tmp_path / "wd"
  (workdir / "checkpoints" / "20" / "params").mkdir(parents=True)
  (workdir / "minet_config.json").write_bytes((tiny_ckpt / "minet_config.json").read_bytes())
  photo = _photo(tmp_path / "in")
  for inside in ("checkpoints", "checkpoints/20"):
    assert dehaze.main(["--ckpt", str(workdir / inside), str(photo), "-o", "o"]) == 2
    assert f"pass the workdir itself ({workdir})" in capsys.readouterr().err


def test_progress_per_stage_and_per_tile(tiny_ckpt):
  params = minet_jax.load(tiny_ckpt)
  image = np.random.default_rng(0).uniform(size=(40, 40, 3)).astype(np.float32)
  calls = []
  dehaze.dehaze_image(params, image, strip_rows=8, progress=lambda *a: calls.append(a))
  assert calls == [(k, 8) for k in range(1, 9)]  # three IM-blocks and five other stages
  calls.clear()
  dehaze.dehaze_image(params, image, tile=16, overlap=4, progress=lambda *a: calls.append(a))
  assert calls == [(k, 9) for k in range(1, 10)]  # 3 x 3 tiles
def test_large_images_and_special_files_are_refused_before_reading(tiny_ckpt, tmp_path,
                                                                   capsys, random_params):
  # A 57-byte PNG declaring 48 MP used to be decoded (Pillow refuses only above 179 MP),
  # and /dev/zero or a FIFO were reported as "no such file or folder".
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", 8000, 6000, 8, 2, 0, 0, 0)
  (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                                      chunk(b"IEND", b""))
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "small.png")
  import os
  os.mkfifo(tmp_path / "pipe.png")
  args = ["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "out"), "--no-progress"]
  assert dehaze.main(args + [str(tmp_path / "bomb.png"), str(tmp_path / "pipe.png")]) == 1
  err = capsys.readouterr().err
  assert ("it declares 8000x6000 pixels (48.0 MP), above the limit of 40 MP "
          "(--max-megapixels); it would need about 16.8 GB of memory") in err
  assert "pipe.png: not a regular file" in err
  # A model solved to a tolerance holds more feature maps (64 B per input pixel each at
  # 64 float32 channels): Anderson (m = 5) with best-so-far answers and two-stage
  # blocks 30 more, as XLA's compiled memory counts them (`strips.stage_memory`):
  # 350 + 30 * 64 bytes per pixel.
  anderson = tmp_path / "anderson"
  minet_jax.save(random_params(ModelConfig(stage_fraction=(1.0, 0.5, 0.7), stages=(1, 2, 2),
                                           solver="anderson", best_so_far=True)), anderson)
  assert dehaze.main(["--ckpt", str(anderson), "-o", str(tmp_path / "out2"), "--no-progress",
                      str(tmp_path / "bomb.png")]) == 1
  assert "it would need about 109.0 GB of memory" in capsys.readouterr().err
  # Tiled, the features are a tile's: the image needs its reading and the tiles' sums.
  assert dehaze.main(["--ckpt", str(anderson), "-o", str(tmp_path / "out2"), "--no-progress",
                      "--tile", "256", str(tmp_path / "bomb.png")]) == 1
  assert "it would need about 4.8 GB of memory" in capsys.readouterr().err
  # Solve options: a bad one is refused in one line naming it, before any model is read;
  # --rtol on a model that runs unrolled is noted, not silently ignored; a tiled run
  # of a model solved to tolerance says it reports no convergence.
  assert dehaze.main(["--ckpt", str(tmp_path / "missing"), "-o", str(tmp_path / "out3"),
                      "--rtol", "-1", str(tmp_path / "small.png")]) == 2
  err = capsys.readouterr().err
  assert "dehaze: error: --rtol: rtol must be finite and >= 0" in err, err
  # No step at all would skip the IM-blocks: refused by the parser.
  with pytest.raises(SystemExit) as e:
    dehaze.main(["-o", str(tmp_path / "out3"), "--max-steps", "0", str(tmp_path / "small.png")])
  assert e.value.code == 2
  assert "argument --max-steps: must be an integer >= 1, got '0'" in capsys.readouterr().err
  # A setting that will run badly is a note of the tool's, not a Python warning.
  assert dehaze.main(["--ckpt", str(anderson), "-o", str(tmp_path / "out6"), "--no-progress",
                      "--dtype", "bfloat16", "--max-steps", "1",
                      str(tmp_path / "small.png")]) == 0
  err = capsys.readouterr().err
  assert "dehaze: note: solver 'anderson' at rtol 0.001 with dtype 'bfloat16'" in err, err
  assert "Warning" not in err
  assert dehaze.main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "out5"), "--no-progress",
                      "--rtol", "1e-6", str(tmp_path / "small.png")]) == 0
  assert "--rtol has no effect: the IM-blocks run unrolled" in capsys.readouterr().err
  assert dehaze.main(["--ckpt", str(anderson), "-o", str(tmp_path / "out4"), "--no-progress",
                      "--tile", "16", str(tmp_path / "small.png")]) == 0
  out, err = capsys.readouterr()
  assert "a tiled run reports no convergence" in err and "IM-blocks" not in out
  assert "dehaze: note: 16 px tiles change the result much on images larger than a tile" in err
  # Tile options without --tile are noted, not ignored in silence.
  assert dehaze.main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "out7"), "--no-progress",
                      "--blend", "linear", str(tmp_path / "small.png")]) == 0
  assert "--overlap and --blend apply to --tile only" in capsys.readouterr().err
  assert "--rtol" not in err
  assert dehaze.main(args + ["--max-megapixels", "0.0005", str(tmp_path / "small.png")]) == 1
  assert "(0.0 MP), above the limit of 0.0005 MP" in capsys.readouterr().err
  assert dehaze.main(args + ["--max-megapixels", "0", str(tmp_path / "small.png")]) == 0
  with pytest.raises(SystemExit):
    dehaze.main(args + ["--max-megapixels", "-1", str(tmp_path / "small.png")])


def test_paths_the_system_refuses_fail_alone_in_one_line(tiny_ckpt, tmp_path, capsys):
  """A name too long to look up raised OSError out of `plan` (Path.is_dir lets it
  through): that input fails alone and the others are written; an -o the system refuses
  is a one-line error before the model loads."""
  good = _photo(tmp_path / "in")
  too_long = tmp_path / ("a" * 300 + ".png")
  out = tmp_path / "out"
  base = ["--ckpt", str(tiny_ckpt), "--no-progress"]
  assert dehaze.main([*base, str(too_long), str(good), "-o", str(out)]) == 1
  err = capsys.readouterr().err
  assert f"failed: {too_long}: cannot read it: File name too long" in err
  assert (out / "a_dehazed.png").is_file()
  assert dehaze.main([*base, str(good), "-o", str(tmp_path / ("o" * 300))]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dehaze: error: -o ") and "File name too long" in err
  assert err.count("\n") == 1


def test_an_output_name_taken_by_a_folder_is_named_as_such(tiny_ckpt, tmp_path, capsys):
  photo = _photo(tmp_path / "in")
  (tmp_path / "out" / "a_dehazed.png").mkdir(parents=True)
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(photo), "-o", str(tmp_path / "out"),
                      "--overwrite", "--no-progress"]) == 1
  assert "a_dehazed.png is a folder; dehaze never replaces folders" in capsys.readouterr().err


def test_ctrl_c_keeps_the_account_of_what_was_written(tiny_ckpt, tmp_path, monkeypatch, capsys):
  for name in ("a.png", "b.png", "c.png"):
    _photo(tmp_path / "in", name)
  real = dehaze.dehaze_image
  calls = []

  def interrupted_at_the_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(dehaze, "dehaze_image", interrupted_at_the_second)
  out = tmp_path / "out"
  assert dehaze.main(["--ckpt", str(tiny_ckpt), str(tmp_path / "in"), "-o", str(out),
                      "--no-progress"]) == 130
  captured = capsys.readouterr()
  assert f"wrote 1 file(s) to {out}" in captured.out
  assert "interrupted" in captured.err and "b.png: not processed: interrupted" in captured.err
  assert sorted(p.name for p in out.iterdir()) == ["a_dehazed.png"]


def test_link_loops_fail_in_one_line(tiny_ckpt, tmp_path, capsys):
  """Path.resolve raises RuntimeError for a link loop (Python 3.11), not OSError."""
  photo = _photo(tmp_path / "in")
  out = tmp_path / "out"
  out.mkdir()
  (out / "a_dehazed.png").symlink_to(out / "a_dehazed.png")
  jobs, failed, _ = dehaze.plan([photo], out, overwrite=True)
  assert jobs == [] and "its output cannot be written" in failed[str(photo)]
  (tmp_path / "loop").symlink_to(tmp_path / "loop")
  jobs, failed, _ = dehaze.plan([photo], tmp_path / "loop" / "sub")
  assert jobs == [] and "the output folder -o cannot be used" in failed[
      str(tmp_path / "loop" / "sub")]
