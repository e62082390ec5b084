"""Writing a file or folder whole: to a temporary sibling, then renamed into place.

Every writer in the package that must never leave a half-written result behind
(saved checkpoints, converted weights, output images, JSON records) goes through
`replacing`, so an interrupted write leaves the old file (or nothing) in place.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterator


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif os.path.lexists(path):
    path.unlink()


def _link_new(tmp: pathlib.Path, target: pathlib.Path) -> None:
  """Puts ``tmp`` at ``target`` unless something is there (a hard link fails atomically)."""
  if os.path.lexists(target):
    raise FileExistsError(f"refusing to overwrite {target}: it already exists")
  try:
    os.link(tmp, target)
  except FileExistsError:
    raise FileExistsError(f"refusing to overwrite {target}: it already exists") from None
  except OSError:  # A file system without hard links: checked above, then renamed.
    os.replace(tmp, target)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, folder: bool = False,
              exclusive: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `path` to write; on success it becomes `path`.

  A file is renamed over `path` atomically. A folder (``folder=True``; it is created,
  empty) replaces whatever is at `path` -- that old entry is removed just before the
  rename. With ``exclusive`` an existing `path` is refused (`FileExistsError`) instead
  of replaced. On any exception the temporary is removed and `path` is untouched.
  Parent folders are created; new files and folders get the umask's permissions.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
  if folder:
    tmp.mkdir()
  try:
    yield tmp
    if folder:
      if exclusive and os.path.lexists(path):
        raise FileExistsError(f"refusing to overwrite {path}: it already exists")
      _remove(path)
      tmp.rename(path)
    elif exclusive:
      _link_new(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    _remove(tmp)


def cache_dir() -> pathlib.Path:
  """Where minet-jax keeps what it builds or downloads once: ``$MINET_JAX_CACHE``, else
  ``~/.cache/minet_jax`` (the compiled oneDNN binding, the released weights)."""
  return pathlib.Path(os.environ.get("MINET_JAX_CACHE",
                                     pathlib.Path.home() / ".cache" / "minet_jax")).expanduser()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` whole (`replacing`)."""
  with replacing(path) as tmp:
    tmp.write_text(text)
