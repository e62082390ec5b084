"""Reading and writing photographs as RGB arrays.

``read_rgb`` turns whatever a user hands us (PNG/JPEG/..., grayscale, palette,
alpha, 16-bit, EXIF-rotated) into one predictable array:

* shape ``(H, W, 3)``, RGB, in the orientation a viewer shows (EXIF applied);
* ``float32`` in ``[0, 1]`` by default, or ``uint8`` with ``dtype=np.uint8``;
* grayscale is replicated to three channels;
* alpha is composited onto a white background (what most viewers show for
  transparent regions; the colour stored under fully transparent pixels is
  often arbitrary and would otherwise leak into the result);
* 16-bit grayscale (``I;16``) keeps its full precision (divided by 65535);
  16-bit colour PNGs are decoded by Pillow at 8 bits per channel (the high
  byte), which is below what the network resolves anyway.

Every failure to read becomes an ``ImageReadError`` naming the file. An image
declaring more than ``max_megapixels`` (`DEFAULT_MAX_MEGAPIXELS`) is refused from
its header, before any pixel is decoded: a PNG of a few hundred KB can declare a
hundred megapixels, and Pillow itself refuses only above 179.
``write_png`` (and ``write_image``, PNG or JPEG by suffix) writes atomically and
refuses paths listed in ``protect`` (used to make sure a tool never overwrites its
inputs); with ``exclusive=True`` it refuses any existing file, in the same atomic
step as the write.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
from PIL import Image

from minet_jax.core import files
from minet_jax.core.config import is_count

PathLike = str | os.PathLike
# An image of either kind: centre_crop slices numpy and JAX arrays alike.
ArrayT = TypeVar("ArrayT")

# Suffixes the folder walkers pick up; anything Pillow opens can still be passed by name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_entry(path: pathlib.Path) -> bool:
  """Whether a folder walker takes ``path`` as an image: a file with one of
  `IMAGE_SUFFIXES`, not hidden. A link to nothing is taken too: reading it fails and is
  reported, where leaving it out would change a score or a batch in silence."""
  return ((path.is_file() or (path.is_symlink() and not path.exists()))
          and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES)


# Largest image `read_rgb` decodes unless told otherwise, in megapixels: above most
# cameras' photos (12-24 MP; dataset images such as O-HAZE's are 20), 1.3 GB to decode.
DEFAULT_MAX_MEGAPIXELS = 40.0
# Peak memory of `read_rgb` per pixel (decoded 8-bit RGBA, float32 RGBA and its RGB
# composite, the float32 result), to state what an image refused for its size would take.
READ_BYTES_PER_PIXEL = 33.0


class ImageReadError(ValueError):
  """An image file could not be read; the message names the file and the cause."""


class ImageTooLargeError(ImageReadError):
  """An image declares more pixels than the caller's limit (checked before decoding)."""


class ProtectedPathError(ValueError):
  """A write would replace a file that must not be overwritten (e.g. an input)."""


# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright.
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
  """The EXIF orientation of ``im``; 1 (as stored) when absent or unreadable: a picture
  is better read unturned than not at all."""
  try:
    orientation = im.getexif().get(0x0112, 1)
  except Exception:  # An EXIF block Pillow cannot parse.
    return 1
  return orientation if isinstance(orientation, int) else 1


def _upright(im: Image.Image) -> Image.Image:
  """``im`` turned as its EXIF orientation says. Only the pixels are turned: Pillow's
  `ImageOps.exif_transpose` also rewrites the EXIF block, and fails on malformed tags
  that cameras do write."""
  method = _ORIENTATIONS.get(_orientation(im))
  return im if method is None else im.transpose(method)


def _to_unit_float(im: Image.Image) -> np.ndarray:
  """Pillow image of any mode -> float32 HxWx3 in [0, 1], alpha composited on white."""
  mode = im.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
    gray = np.asarray(im).astype(np.float32) / 65535.0
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "I":
    # 32-bit integer images come from 16-bit sources (PNG/TIFF) in practice.
    arr = np.asarray(im).astype(np.float64)
    scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
    gray = np.clip(arr / scale, 0.0, 1.0).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "F":
    arr = np.asarray(im).astype(np.float32)
    if not np.isfinite(arr).all():
      raise ValueError("the float image holds NaN or infinite values")
    # [0, 1] with some overshoot (clipped), else 0..255: one pixel just above 1 must not
    # darken the whole picture 255-fold.
    scale = 1.0 if arr.max(initial=0) <= 2.0 else 255.0
    gray = np.clip(arr / scale, 0.0, 1.0)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      mode == "P" and "transparency" in im.info) or (
      mode in ("L", "RGB") and "transparency" in im.info)
  if has_alpha:
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + (1.0 - alpha)
  return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def check_regular_file(path: pathlib.Path) -> None:
  """Raises ImageReadError unless `path` is a regular file (saying what it is instead)."""
  if path.is_file():
    return
  if path.is_dir():
    problem = "it is a folder, not an image file"
  elif path.exists():
    # A device such as /dev/zero or a FIFO would be read forever or block.
    problem = "it is not a regular file (a device, FIFO or socket)"
  else:
    problem = "no such file"
  raise ImageReadError(f"cannot read image {path}: {problem}")


def _check_size(path: pathlib.Path, im: Image.Image, max_megapixels: float | None,
                bytes_per_pixel: float, limit_name: str) -> None:
  megapixels = im.width * im.height / 1e6
  if max_megapixels is not None and megapixels > max_megapixels:
    raise ImageTooLargeError(
        f"cannot read image {path}: it declares {im.width}x{im.height} pixels "
        f"({megapixels:.1f} MP), above the limit of {max_megapixels:g} MP ({limit_name}); "
        f"it would need about {megapixels * bytes_per_pixel / 1e3:.1f} GB of memory")


def _beyond_pillow(path: pathlib.Path, error: Exception, limit_name: str) -> ImageTooLargeError:
  """Pillow's own refusal (above twice ``PIL.Image.MAX_IMAGE_PIXELS``, 179 MP by default,
  raised as it opens the file, before any limit of ours is checked), said as ours."""
  return ImageTooLargeError(
      f"cannot read image {path}: {error} Pillow refuses images that large whatever "
      f"{limit_name} says; raise PIL.Image.MAX_IMAGE_PIXELS in Python to read it")


# EXIF orientations that swap width and height (transposed or rotated by 90 degrees).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: PathLike, *, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS
               ) -> tuple[int, int]:
  """(height, width) of an image file as `read_rgb` returns it, from the header alone.

  Raises:
    ImageReadError: as `read_rgb` for a file that is missing, not a regular file, not an
      image or larger than `max_megapixels` (truncated pixel data is not seen here).
  """
  path = pathlib.Path(path)
  check_regular_file(path)
  try:
    with Image.open(path) as im:
      _check_size(path, im, max_megapixels, READ_BYTES_PER_PIXEL, "max_megapixels")
      # Pillow's TIFF reader already gives the upright size (and turns the pixels as it
      # decodes them, dropping the tag); other formats give the stored size.
      transposed = (_orientation(im) in _TRANSPOSING_ORIENTATIONS
                    and im.format != "TIFF")
      return (im.width, im.height) if transposed else (im.height, im.width)
  except (ImageReadError, MemoryError):
    raise
  except Image.DecompressionBombError as e:
    raise _beyond_pillow(path, e, "max_megapixels") from e
  except Exception as e:  # Pillow raises many types on damaged files.
    raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def read_rgb(path: PathLike, dtype: type | np.dtype = np.float32, *,
             max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
             bytes_per_pixel: float = READ_BYTES_PER_PIXEL,
             limit_name: str = "max_megapixels") -> np.ndarray:
  """Reads an image file as an upright RGB array of shape (H, W, 3).

  Args:
    path: the image file.
    dtype: ``np.float32`` (default) for values in [0, 1], or ``np.uint8`` for
      0..255 (16-bit sources are rounded to 8 bits).
    max_megapixels: refuse images declaring more pixels than this (None: no limit
      but Pillow's own), from the header, before decoding.
    bytes_per_pixel, limit_name: what the refusal says the image would need in
      memory per pixel (a caller states its own use), and what sets the limit.

  Raises:
    ImageReadError: the file is missing, not a regular file, not an image, truncated,
      corrupt, or (`ImageTooLargeError`) larger than `max_megapixels`.
  """
  path = pathlib.Path(path)
  dtype = np.dtype(dtype)
  if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
    raise ValueError(f"read_rgb: dtype must be float32 or uint8, got {dtype}")
  check_regular_file(path)
  try:
    with Image.open(path) as im:
      _check_size(path, im, max_megapixels, bytes_per_pixel, limit_name)
      im.load()  # Decode now so truncated files fail here, not later.
      rgb = _to_unit_float(_upright(im))
  except (ImageReadError, MemoryError):
    raise
  except Image.DecompressionBombError as e:
    raise _beyond_pillow(path, e, limit_name) from e
  except Exception as e:  # Pillow's decoders raise many types on damaged files.
    raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
  if dtype == np.uint8:
    return np.round(rgb * 255.0).astype(np.uint8)
  return rgb


def to_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 passes through; floats are read as [0, 1], clipped and rounded."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise TypeError(f"expected uint8 or a float image in [0, 1], got dtype {image.dtype}")
  if not np.all(np.isfinite(image)):
    raise ValueError("image contains NaN or infinite values")
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def centre_crop(image: ArrayT, height: int, width: int) -> ArrayT:
  """The centre ``height x width`` window of an image; equal sizes pass through.

  ``image`` is (H, W), (H, W, C) or a batch (..., H, W, C), a numpy or a JAX array
  (only sliced). Used for SOTS ground truths, released at 640x480 around 620x460
  hazy images (10 px on each side).
  """
  axis = 0 if image.ndim == 2 else image.ndim - 3  # The height axis.
  h, w = image.shape[axis], image.shape[axis + 1]
  if not (is_count(height, 1) and is_count(width, 1)):
    raise ValueError(f"a crop's height and width must be integers >= 1, got {height!r} x "
                     f"{width!r}")
  if height > h or width > w:
    raise ValueError(f"cannot centre-crop a {h}x{w} image to {height}x{width}: the image is "
                     "smaller than that (a crop cannot be larger than its image)")
  top, left = (h - height) // 2, (w - width) // 2
  window = [slice(None)] * image.ndim
  window[axis] = slice(top, top + height)
  window[axis + 1] = slice(left, left + width)
  return image[tuple(window)]


# Formats `write_image` writes, by file suffix: Pillow's format name and save options.
WRITE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}),
                 ".jpeg": ("JPEG", {"quality": 95})}


def write_png(path: PathLike, image: np.ndarray, *,
              protect: Iterable[PathLike] = (), exclusive: bool = False) -> pathlib.Path:
  """Writes an RGB (H, W, 3) or gray (H, W) image as an 8-bit PNG.

  ``image`` is uint8, or float in [0, 1] (clipped and rounded; a float image above 2 is
  refused as one on the 0..255 scale, which clipping would turn white). The file is
  written to a temporary name in the same folder and renamed into place, so a
  crash never leaves a half-written PNG. Parent folders are created.

  Raises:
    ValueError: ``path`` does not end in .png (`write_image` writes JPEG too), or the
      image is not one.
    ProtectedPathError: ``path`` resolves to one of ``protect``.
    FileExistsError: ``exclusive`` and something already exists at ``path``.
  """
  if pathlib.Path(path).suffix.lower() != ".png":
    raise ValueError(f"cannot write {path} as a PNG: its suffix is not .png (write_image "
                     "writes the format the suffix names)")
  return _write(path, image, "PNG", {}, protect, exclusive)


def write_image(path: PathLike, image: np.ndarray, *,
                protect: Iterable[PathLike] = (), exclusive: bool = False) -> pathlib.Path:
  """`write_png`, in the format `path`'s suffix names (`WRITE_FORMATS`: PNG or JPEG)."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in WRITE_FORMATS:
    raise ValueError(f"cannot write {path}: the suffix must be one of "
                     f"{', '.join(WRITE_FORMATS)}")
  return _write(path, image, *WRITE_FORMATS[suffix], protect, exclusive)


def _write(path: PathLike, image: np.ndarray, image_format: str, options: dict,
           protect: Iterable[PathLike], exclusive: bool) -> pathlib.Path:
  path = pathlib.Path(path)
  target = path.resolve()
  for p in protect:
    if pathlib.Path(p).resolve() == target:
      raise ProtectedPathError(f"refusing to overwrite {path}: it is a protected input file")
  image = np.asarray(image)
  top = (np.max(image, initial=0.0, where=np.isfinite(image))
         if np.issubdtype(image.dtype, np.floating) else 0.0)
  if top > 2.0:
    # The reader's own rule (`_to_unit_float`): overshoot above 1 is clipped, but this is
    # the 0..255 scale, which clipping would write as white.
    raise ValueError(f"cannot write {path}: a float image is read as [0, 1], and this one "
                     f"reaches {float(top):g}; divide 0..255 values by 255 or "
                     "pass uint8")
  data = to_uint8(image)
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
    raise ValueError(f"write_png expects (H, W, 3) or (H, W), got shape {data.shape}")
  if path.is_dir():  # Replacing would fail at the rename, naming the temporary file.
    raise IsADirectoryError(f"cannot write {path}: it is a folder")
  # The path itself, not what it resolves to: a link at `path` is replaced, never the
  # file it points to, which may lie outside the output folder.
  with files.replacing(path, exclusive=exclusive) as tmp:
    Image.fromarray(data).save(tmp, format=image_format, **options)
  return path
