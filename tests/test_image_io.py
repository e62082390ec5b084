"""Tests for minet_jax.image_io: every input kind ends up as upright RGB in [0, 1]."""

from __future__ import annotations

import os
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minet_jax import image_io


def _rand_rgb(h=6, w=5, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16(path, a):
  """Minimal 16-bit PNG writer (filter 0), independent of Pillow."""
  h, w, c = a.shape
  raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                   chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgb_png_roundtrip_exact(tmp_path):
  a = _rand_rgb()
  Image.fromarray(a).save(tmp_path / "a.png")
  f = image_io.read_rgb(tmp_path / "a.png")
  assert f.dtype == np.float32 and f.shape == (6, 5, 3)
  assert f.min() >= 0 and f.max() <= 1
  np.testing.assert_array_equal(image_io.read_rgb(tmp_path / "a.png", np.uint8), a)
  np.testing.assert_allclose(f, a / 255.0, atol=1e-7)
  image_io.write_png(tmp_path / "b.png", f)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), a)


def test_grayscale_is_replicated(tmp_path):
  g = _rand_rgb()[..., 0]
  Image.fromarray(g, mode="L").save(tmp_path / "g.png")
  out = image_io.read_rgb(tmp_path / "g.png", np.uint8)
  assert out.shape == (6, 5, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], g)


def test_gray16_full_precision(tmp_path):
  g = np.random.default_rng(1).integers(0, 65536, (4, 7, 1), dtype=np.uint16)
  _png16(tmp_path / "g16.png", g)
  out = image_io.read_rgb(tmp_path / "g16.png")
  np.testing.assert_allclose(out[..., 1], g[..., 0] / 65535.0, atol=1e-7)


def test_rgb16_png(tmp_path):
  a = np.random.default_rng(2).integers(0, 65536, (4, 7, 3), dtype=np.uint16)
  _png16(tmp_path / "c16.png", a)
  out = image_io.read_rgb(tmp_path / "c16.png")
  assert out.shape == (4, 7, 3)
  # Read at 8-bit precision: within one 8-bit step of the 16-bit truth.
  np.testing.assert_allclose(out, a / 65535.0, atol=1.5 / 255)


def test_alpha_composited_on_white(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
  rgba[0, 1] = (0, 0, 0, 0)  # transparent -> white
  rgba[1, 0] = (0, 0, 0, 128)  # half black over white -> mid gray
  rgba[1, 1] = (0, 0, 255, 255)
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
  out = image_io.read_rgb(tmp_path / "a.png")
  np.testing.assert_allclose(out[0, 0], [1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(out[0, 1], [1, 1, 1], atol=1e-6)
  np.testing.assert_allclose(out[1, 0], [1 - 128 / 255] * 3, atol=1e-6)
  np.testing.assert_allclose(out[1, 1], [0, 0, 1], atol=1e-6)


def test_la_and_palette_with_transparency(tmp_path):
  la = np.array([[[10, 255], [200, 0]]], np.uint8)
  Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
  out = image_io.read_rgb(tmp_path / "la.png", np.uint8)
  np.testing.assert_array_equal(out[0, 0], [10, 10, 10])
  np.testing.assert_array_equal(out[0, 1], [255, 255, 255])

  p = Image.new("P", (2, 1))
  p.putpalette([0, 255, 0, 0, 0, 0] + [0] * 762)
  p.putpixel((0, 0), 0)
  p.putpixel((1, 0), 1)
  p.info["transparency"] = 1
  p.save(tmp_path / "p.png", transparency=1)
  out = image_io.read_rgb(tmp_path / "p.png", np.uint8)
  np.testing.assert_array_equal(out[0, 0], [0, 255, 0])
  np.testing.assert_array_equal(out[0, 1], [255, 255, 255])


def test_exif_orientation_applied(tmp_path):
  a = _rand_rgb(3, 5)
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  im.save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
  out = image_io.read_rgb(tmp_path / "r.jpg", np.uint8)
  assert out.shape == (5, 3, 3)
  # Orientation 6 shows the stored image rotated 90 degrees clockwise.
  expect = np.rot90(a, k=-1)
  assert np.abs(out.astype(int) - expect.astype(int)).mean() < 8


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_size_is_the_read_images_for_every_orientation(tmp_path, suffix, orientation):
  # Pillow's TIFF reader turns the size (and the pixels) itself; the others do not.
  im = Image.fromarray(_rand_rgb(3, 5))
  exif = im.getexif()
  exif[0x0112] = orientation
  path = tmp_path / f"r.{suffix}"
  im.save(path, exif=exif)
  assert image_io.image_size(path) + (3,) == image_io.read_rgb(path).shape
  assert image_io.read_rgb(path).shape[:2] == ((5, 3) if orientation >= 5 else (3, 5))


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_raises_naming_file(tmp_path, content):
  path = tmp_path / "bad.png"
  if content is None:  # truncated real PNG
    Image.fromarray(_rand_rgb(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
  else:
    path.write_bytes(content)
  with pytest.raises(image_io.ImageReadError, match="bad.png"):
    image_io.read_rgb(path)


def test_missing_file(tmp_path):
  with pytest.raises(image_io.ImageReadError, match="nope.png"):
    image_io.read_rgb(tmp_path / "nope.png")


def _declared_png(path, width, height):
  """A PNG header declaring width x height 8-bit RGB pixels, and no pixel data."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_large_images_are_refused_from_the_header(tmp_path):
  # 48 MP below Pillow's own limit (179 MP) in a 57-byte file: read_rgb used to allocate
  # the pixels before finding there were none. Now the header decides, before decoding.
  path = tmp_path / "bomb.png"
  _declared_png(path, 8000, 6000)
  with pytest.raises(image_io.ImageTooLargeError) as e:
    image_io.read_rgb(path)
  message = str(e.value)
  assert message == (f"cannot read image {path}: it declares 8000x6000 pixels (48.0 MP), above "
                     f"the limit of {image_io.DEFAULT_MAX_MEGAPIXELS:g} MP (max_megapixels); "
                     "it would need about 1.6 GB of memory")
  with pytest.raises(image_io.ImageTooLargeError, match="limit of 10 MP"):
    image_io.image_size(path, max_megapixels=10)
  with pytest.raises(image_io.ImageTooLargeError, match=r"limit of 1e-05 MP \(--max\)"):
    small = tmp_path / "small.png"
    Image.fromarray(_rand_rgb()).save(small)
    image_io.read_rgb(small, max_megapixels=1e-5, limit_name="--max")
  assert image_io.image_size(small) == (6, 5)
  assert image_io.read_rgb(small, max_megapixels=None).shape == (6, 5, 3)
  # Above Pillow's own limit its refusal comes first, and says so in our terms.
  _declared_png(path, 100000, 100000)
  with pytest.raises(image_io.ImageTooLargeError,
                     match=r"(?s)bomb.*whatever --max says; raise PIL.Image.MAX_IMAGE_PIXELS"):
    image_io.read_rgb(path, max_megapixels=None, limit_name="--max")
  with pytest.raises(image_io.ImageTooLargeError, match="whatever max_megapixels says"):
    image_io.image_size(path)


def test_what_is_not_a_regular_file_is_named(tmp_path):
  # A folder, a FIFO or a device used to be reported as "no such file".
  with pytest.raises(image_io.ImageReadError, match="it is a folder, not an image file"):
    image_io.read_rgb(tmp_path)
  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)
  for path in (fifo, pathlib.Path("/dev/zero")):
    if path.exists():
      with pytest.raises(image_io.ImageReadError, match="it is not a regular file"):
        image_io.read_rgb(path)
  with pytest.raises(image_io.ImageReadError, match="no such file"):
    image_io.image_size(tmp_path / "nope.png")


def test_write_png_refuses_protected_and_clips(tmp_path):
  src = tmp_path / "in.png"
  Image.fromarray(_rand_rgb()).save(src)
  before = src.read_bytes()
  with pytest.raises(image_io.ProtectedPathError, match="in.png"):
    image_io.write_png(tmp_path / "sub" / ".." / "in.png", np.zeros((6, 5, 3)), protect=[src])
  assert src.read_bytes() == before
  image_io.write_png(tmp_path / "new" / "o.png", np.array([[[-1.0, 0.5, 2.0]]]))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "new" / "o.png")),
                                [[[0, 128, 255]]])
  assert not list((tmp_path / "new").glob("*.tmp"))
  with pytest.raises(ValueError, match="NaN"):
    image_io.write_png(tmp_path / "n.png", np.full((2, 2, 3), np.nan))
  # Floats on the 0..255 scale would clip to white; a PNG under another suffix would lie.
  with pytest.raises(ValueError, match="reaches 255; divide 0..255 values by 255"):
    image_io.write_png(tmp_path / "w.png", np.full((2, 2, 3), 255.0))
  with pytest.raises(ValueError, match="its suffix is not .png"):
    image_io.write_png(tmp_path / "w.jpg", np.zeros((2, 2, 3)))
  assert not (tmp_path / "w.png").exists() and not (tmp_path / "w.jpg").exists()


def test_centre_crop():
  # A colour image, as the metrics crop SOTS ground truths.
  gt = np.arange(6 * 8 * 3).reshape(6, 8, 3)
  np.testing.assert_array_equal(image_io.centre_crop(gt, 4, 4), gt[1:5, 2:6])
  with pytest.raises(ValueError, match="larger"):
    image_io.centre_crop(gt, 7, 8)
  # A grey image, and the identity crop.
  image = np.arange(6 * 8).reshape(6, 8)
  np.testing.assert_array_equal(image_io.centre_crop(image, 2, 4), image[2:4, 2:6])
  np.testing.assert_array_equal(image_io.centre_crop(image, 6, 8), image)
  with pytest.raises(ValueError, match="smaller"):
    image_io.centre_crop(image, 7, 8)


def test_malformed_exif_still_reads_upright(tmp_path):
  """A camera's EXIF block that Pillow decodes but cannot write back (a string where a
  number belongs) made `ImageOps.exif_transpose` raise struct.error: the picture is
  still read, and turned by its orientation tag."""
  a = _rand_rgb(4, 6)
  exif = Image.Exif()
  exif[0x0112] = 6
  exif[0x010F] = "Cam"  # Make (ASCII), retagged below as SamplesPerPixel (a number).
  Image.fromarray(a).save(tmp_path / "cam.jpg", exif=exif.tobytes(), quality=100,
                          subsampling=0)
  data = bytearray((tmp_path / "cam.jpg").read_bytes())
  at = data.index(b"\x01\x0f\x00\x02")
  data[at:at + 2] = b"\x01\x15"
  (tmp_path / "cam.jpg").write_bytes(bytes(data))
  out = image_io.read_rgb(tmp_path / "cam.jpg", np.uint8)
  assert out.shape == (6, 4, 3) == image_io.image_size(tmp_path / "cam.jpg") + (3,)
  assert np.abs(out.astype(int) - np.rot90(a, k=-1).astype(int)).mean() < 8


def test_float_images_keep_their_scale_and_refuse_nan(tmp_path):
  """A float ("F") image in [0, 1] with one pixel just above 1 is still [0, 1] (not
  divided by 255), a 0..255 one is scaled, and NaN is refused instead of read as black."""
  unit = np.full((4, 5), 0.5, np.float32)
  unit[0, 0] = 1.02
  Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
  got = image_io.read_rgb(tmp_path / "unit.tif")
  np.testing.assert_allclose(got[1:, 1:], 0.5)
  assert got[0, 0, 0] == 1.0
  Image.fromarray(unit * 200, mode="F").save(tmp_path / "wide.tif")
  np.testing.assert_allclose(image_io.read_rgb(tmp_path / "wide.tif")[1, 1], 100 / 255)
  unit[1, 1] = np.nan
  Image.fromarray(unit, mode="F").save(tmp_path / "nan.tif")
  with pytest.raises(image_io.ImageReadError, match="nan.tif.*NaN"):
    image_io.read_rgb(tmp_path / "nan.tif")


def test_a_link_is_replaced_never_what_it_points_to(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep")
  out = tmp_path / "out"
  out.mkdir()
  (out / "x.png").symlink_to(victim)
  image_io.write_png(out / "x.png", np.zeros((2, 3, 3)))
  assert victim.read_text() == "keep"
  assert not (out / "x.png").is_symlink()
  assert image_io.read_rgb(out / "x.png").shape == (2, 3, 3)


def test_the_longest_name_a_file_system_takes_can_be_written(tmp_path):
  """The temporary beside a file is named after it: it must fit where the name fits."""
  path = tmp_path / ("b" * 251 + ".png")
  image_io.write_png(path, np.zeros((2, 3, 3)))
  assert image_io.read_rgb(path).shape == (2, 3, 3)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]
