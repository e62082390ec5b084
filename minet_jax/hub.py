"""The authors' released weights in one call, and their ``.pth`` wherever a checkpoint goes.

    params = minet_jax.pretrained("its")      # downloaded once, then read from the cache
    params = minet_jax.load("model_ITS.pth")  # a .pth already on disk, converted in memory

`pretrained` downloads the authors' ``model_ITS.pth`` from their GitHub repository
on first use, checks it against pinned SHA-256 digests, and keeps it in
``<cache>/weights/`` (`download_dir`: the ``cache_dir`` argument, else
``$MINET_JAX_CACHE``, else ``~/.cache/minet_jax``); later calls read that copy and
need no network. Every read goes through `minet_jax.convert.weights_from_checkpoint`,
the torch-free reader that imports and calls nothing the pickle names.

Without network the first call fails with `DownloadError`, which says where to put a
copy fetched by hand. The command-line tools take the same names: ``--ckpt its``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

from minet_jax.core import checkpoint, files
from minet_jax import convert
from minet_jax.convert import torch_names, torch_pickle
from minet_jax.core.params import Params, weights_checksum


@dataclasses.dataclass(frozen=True)
class Release:
  """One released checkpoint: where it is published and what it must hold."""
  file_name: str
  url: str
  # SHA-256 of the published file, as served.
  file_sha256: str
  # `minet_jax.core.params.weights_checksum` of its converted weights: names, shapes and
  # float32 bytes, whatever the pickle around them says.
  weights_sha256: str
  description: str


# The file as committed at the pinned revision of the authors' repository (2,570,580 bytes,
# PyTorch's legacy serialization, epoch 175). A download is accepted when either digest
# matches: the file digest first, checked before anything is parsed; otherwise the weights
# digest, so that a copy re-saved by PyTorch (its zip format, a `state_dict` only) or
# one whose embedded source strings were stripped is accepted when it holds exactly these
# weights. Reading an unverified file to compute the second digest is safe: the reader is
# built for untrusted input (nothing named is imported or called, reads are capped at
# `convert.read_limit`).
RELEASES = {
    "its": Release(
        file_name="model_ITS.pth",
        url=("https://raw.githubusercontent.com/Jiawei-Shen/MI-Net/"
             "deeb9b0041062ace7e4a8f04bbdef83815b8fd70/model_ITS.pth"),
        file_sha256="c295ae2321837e2ddf4fdcb12e7c77b057f7efb92b920e94fc00e034ccc36ecb",
        weights_sha256="d254297e5ddf799e1e8a962961d8ec35e9c5a65e6b82fb16ca64b5b8fd1f8469",
        description="MI-Net trained by its authors on RESIDE ITS (indoor synthetic haze)"),
}
HOME_PAGE = "https://github.com/Jiawei-Shen/MI-Net"
# A download larger than this is cut off: the released file is 2.6 MB.
MAX_DOWNLOAD_BYTES = 64 << 20
URL_ENV = "MINET_JAX_WEIGHTS_URL"  # A mirror: a base URL holding the release's file name.


class DownloadError(OSError):
  """The released weights could not be fetched, or what was fetched is not them."""


def download_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding downloaded weights: `path` itself when given, else
  ``<the package cache>/weights``."""
  return pathlib.Path(path).expanduser() if path is not None else files.cache_dir() / "weights"


def release_url(name: str) -> str:
  """Where `name`'s file is downloaded from: ``$MINET_JAX_WEIGHTS_URL/<file>``, else upstream."""
  release = _release(name)
  mirror = os.environ.get(URL_ENV)
  return f"{mirror.rstrip('/')}/{release.file_name}" if mirror else release.url


def _release(name: str) -> Release:
  if name not in RELEASES:
    raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(RELEASES)}")
  return RELEASES[name]


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def load_pth(path: str | os.PathLike) -> Params:
  """The weights of an authors' PyTorch ``.pth`` (legacy or zip format), converted in memory.

  Raises `minet_jax.CheckpointError` (an OSError) naming the file when it is not a
  readable MI-Net checkpoint, or tries to run code.
  """
  try:
    return convert.weights_from_checkpoint(path)
  except (torch_pickle.UnsafePickleError, torch_pickle.CheckpointFormatError,
          torch_names.StateDictMismatch) as e:
    raise checkpoint.CheckpointError(f"{path} is not a usable MI-Net .pth checkpoint: {e}") from e


def verified(path: str | os.PathLike, name: str = "its") -> Params:
  """`load_pth`, refusing any file that does not hold release `name`'s weights exactly."""
  release = _release(name)
  path = pathlib.Path(path)
  file_ok = _sha256(path) == release.file_sha256
  try:
    params = load_pth(path)
  except checkpoint.CheckpointError as e:
    # `load_pth`'s message names the path again; the reason is its cause's.
    reason = str(e.__cause__ or e).removeprefix(f"{path}: ")
    raise DownloadError(f"{path} is not the released {release.file_name}: {reason}") from e
  if not file_ok and weights_checksum(params.weights) != release.weights_sha256:
    raise DownloadError(f"{path} does not hold the released {release.file_name} weights "
                        "(SHA-256 mismatch): the file was changed or damaged")
  return params


def _content_length(value: str | None) -> int | None:
  """A Content-Length header's byte count; None when absent or not one number (a
  repeated equal value, as HTTP lets a server send, counts once)."""
  counts = {v.strip() for v in (value or "").split(",")}
  if len(counts) != 1:
    return None
  (count,) = counts
  return int(count) if count.isdigit() and int(count) > 0 else None


def _download(url: str, target: pathlib.Path, *, progress: bool,
              check: Callable[[pathlib.Path], Params]) -> Params:
  """Streams `url` into `target` whole and returns ``check`` of it: the file is checked
  as a temporary sibling and renamed into place only once it passed."""
  print(f"downloading {url}\n  to {target}", file=sys.stderr)
  with files.replacing(target) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        total = _content_length(response.headers.get("Content-Length"))
        bar = None
        if progress:
          from tqdm import tqdm
          bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name, file=sys.stderr)
        size = 0
        try:
          for block in iter(lambda: response.read(1 << 16), b""):
            size += len(block)
            if size > MAX_DOWNLOAD_BYTES:
              raise DownloadError(f"{url} sent more than {MAX_DOWNLOAD_BYTES:,} bytes; "
                                  "it is not the released checkpoint")
            out.write(block)
            if bar is not None:
              bar.update(len(block))
        finally:
          if bar is not None:
            bar.close()
        if total is not None and size != total:  # Closed early without an error.
          raise ConnectionError(f"the connection closed after {size:,} of {total:,} bytes")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      # HTTPException: e.g. IncompleteRead, a connection dropped mid-body.
      if isinstance(e, DownloadError):
        raise
      reason = getattr(e, "reason", None) or e
      raise DownloadError(f"could not download {url}: {reason}") from e
    return check(tmp)


def pretrained(name: str = "its", *, cache_dir: str | os.PathLike | None = None,
               url: str | None = None, progress: bool = True) -> Params:
  """The authors' released model `name` ("its"), downloaded on first use.

  Args:
    name: a key of `RELEASES`.
    cache_dir: the folder for the downloaded file (default ``$MINET_JAX_CACHE/weights``,
      else ``~/.cache/minet_jax/weights``).
    url: download from here instead of the authors' repository (a mirror): the file's
      own URL, or a folder's ending in ``/`` that holds it under its released name (as
      ``$MINET_JAX_WEIGHTS_URL`` does); the file must still hold the released weights.
    progress: a download progress bar on stderr.

  Raises:
    DownloadError (an OSError): no network and no cached copy (the message says where to
      put one fetched by hand), or the file fetched or cached is not the release.
  """
  release = _release(name)
  target = download_dir(cache_dir) / release.file_name
  if os.path.lexists(target) and not target.is_file():
    raise DownloadError(f"{target} is in the way of the download: it is not a file; move it "
                        "away to download the weights again")
  if target.is_file():
    try:
      return verified(target, name)
    except DownloadError as e:
      raise DownloadError(f"the cached {e}; delete {target} to download it again") from e
  source = (url + release.file_name if url.endswith("/") else url) if url else release_url(name)

  def check(downloaded: pathlib.Path) -> Params:
    try:
      return verified(downloaded, name)
    except DownloadError as e:  # Named as what was sent; the temporary is removed.
      raise DownloadError(str(e).replace(str(downloaded), f"what {source} sent")) from None

  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    where = ("pass a cache_dir that can be written" if cache_dir is not None else
             f"set {files.CACHE_ENV} to a folder that can be written")
    raise DownloadError(
        f"the weights cannot be kept in {target.parent}: {e.strerror or e}; {where}") from None
  try:
    return _download(source, target, progress=progress, check=check)
  except DownloadError as e:
    if e.__cause__ is None:  # The server answered, with something that is not the file.
      raise
    raise DownloadError(
        f"{e}. Without network: fetch {release.file_name} from {HOME_PAGE} by other means "
        f"and put it at {target} (or pass its path: minet_jax.load(PATH), --ckpt PATH)"
    ) from e


def names_release(spec: str | os.PathLike) -> bool:
  """Whether `resolve` takes ``spec`` for a release name: one of RELEASES that is not
  also an existing path (which wins)."""
  return str(spec) in RELEASES and not os.path.lexists(pathlib.Path(spec).expanduser())


def resolve(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
            progress: bool = True) -> Params:
  """What the tools' ``--ckpt`` names: a release ("its"), a ``.pth`` file, a checkpoint
  folder or a training workdir. An existing path wins over a release name."""
  path = pathlib.Path(spec).expanduser()
  if names_release(spec):
    return pretrained(str(spec), cache_dir=cache_dir, progress=progress)
  if path.is_file():
    return load_pth(path)
  if not os.path.lexists(path):
    raise checkpoint.CheckpointError(
        f"{spec}: no such checkpoint folder or .pth file, and not a pretrained model name "
        f"({', '.join(RELEASES)})")
  return checkpoint.load(path)
