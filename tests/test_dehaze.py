"""python -m minet_jax.dehaze: odd inputs, corrupt files, never overwriting; tiling."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import minet_jax
from minet_jax import dehaze, metrics, tiling
from minet_jax.config import ModelConfig


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


def test_output_folder_inside_the_input_folder_is_reported(tiny_ckpt, tmp_path, capsys):
  photos = tmp_path / "photos"
  _png(photos / "a.png", 1)
  _png(photos / "sub" / "b.png", 2)
  _png(photos / "out" / "real.png", 3)        # the user's image inside the chosen -o
  _png(photos / "old" / "a_dehazed.png", 4)   # a result of an earlier run
  rc = dehaze.main(["--ckpt", str(tiny_ckpt), str(photos), "-o", str(photos / "out"),
                    "--recursive", "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 1  # real.png was not processed, and that is an error
  assert f"skipped: {photos / 'old' / 'a_dehazed.png'}: named like an earlier result" in err
  assert f"failed: {photos / 'out' / 'real.png'}: not processed: it lies inside the output" in err
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


def test_large_images_and_special_files_are_refused_before_reading(tiny_ckpt, tmp_path,
                                                                   capsys):
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
  assert dehaze.main(args + ["--max-megapixels", "0.0005", str(tmp_path / "small.png")]) == 1
  assert "(0.0 MP), above the limit of 0.0005 MP" in capsys.readouterr().err
  assert dehaze.main(args + ["--max-megapixels", "0", str(tmp_path / "small.png")]) == 0
  with pytest.raises(SystemExit):
    dehaze.main(args + ["--max-megapixels", "-1", str(tmp_path / "small.png")])
