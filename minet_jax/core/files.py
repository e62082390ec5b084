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
import tempfile
from collections.abc import Iterator, Sequence


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif os.path.lexists(path):
    path.unlink()


def _check_replaceable(path: pathlib.Path) -> None:
  """Refuses to replace a folder that holds the current folder (``.``, ``..``, the root):
  the whole tree would be deleted to put the new folder in its place."""
  if path.parent == path:
    raise ValueError(f"refusing to replace {path}: it is the file system's root")
  if path.is_symlink():  # Only the link itself is replaced.
    return
  real, here = path.resolve(), pathlib.Path.cwd().resolve()
  if real == here or real in here.parents:
    raise ValueError(f"refusing to replace {path}: it holds the current folder; choose a new "
                     "folder")


def _shortened(name: str, limit: int = 200) -> str:
  """``name`` cut to at most ``limit`` bytes, so a temporary's name (18 bytes longer)
  fits the 255 bytes most file systems allow wherever ``name`` itself fits."""
  while len(os.fsencode(name)) > limit:
    name = name[:-1]
  return name


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
  rename; a folder holding the current folder is refused (`ValueError`). With
  ``exclusive`` an existing `path` is refused (`FileExistsError`) instead of replaced.
  On any exception the temporary is removed and `path` is untouched.
  Parent folders are created; new files and folders get the umask's permissions.
  """
  path = pathlib.Path(path).absolute()
  if path.name == "..":  # Resolved, so the temporary is a sibling and never inside it.
    path = path.resolve()
  if folder:
    _check_replaceable(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{_shortened(path.name)}.{secrets.token_hex(6)}.tmp"
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


CACHE_ENV = "MINET_JAX_CACHE"


def cache_dir() -> pathlib.Path:
  """Where minet-jax keeps what it builds or downloads once: ``$MINET_JAX_CACHE``, else
  ``~/.cache/minet_jax`` (the compiled oneDNN binding, the released weights)."""
  return pathlib.Path(os.environ.get(CACHE_ENV,
                                     pathlib.Path.home() / ".cache" / "minet_jax")).expanduser()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` whole (`replacing`)."""
  with replacing(path) as tmp:
    tmp.write_text(text)


def check_output_folder(out: str | os.PathLike, *, overwrite: bool,
                        writes: Sequence[str] | None = None, what: str = "--out") -> None:
  """Raises ValueError (naming ``what``) unless a report can be written into folder
  ``out``; creates nothing, so a bad folder is refused before any work.

  Files already there are refused unless ``overwrite`` (they would be replaced): those
  named in ``writes``, or, when None, anything. Writing is tried with a temporary file
  that is removed at once.
  """
  try:
    _check_output_folder(pathlib.Path(out), overwrite, writes, what)
  except OSError as e:  # A folder that cannot be looked into, a name too long, ...
    raise ValueError(f"{what} {out} cannot be used: {e.strerror or e}") from e


def _check_output_folder(out: pathlib.Path, overwrite: bool, writes: Sequence[str] | None,
                         what: str) -> None:
  if out.exists() and not out.is_dir():
    raise ValueError(f"{what} {out} is a file, not a folder")
  folders = sorted(name for name in writes or () if (out / name).is_dir())
  if folders:  # Files replace files; a folder in the way would fail after all the work.
    raise ValueError(f"{what} {out} holds a folder named {folders[0]}, where a file will be "
                     "written; move it or choose another folder")
  if out.is_dir() and not overwrite:
    if writes is None and any(out.iterdir()):
      raise ValueError(f"{what} {out} already holds files; choose another folder, or pass "
                       "--overwrite to replace its report")
    taken = sorted(name for name in writes or () if os.path.lexists(out / name))
    if taken:
      named = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
      raise ValueError(f"{what} {out} already holds {named}; choose another folder, or pass "
                       "--overwrite to replace them")
  existing = out
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f"{what} {out} cannot be created: {existing} is a file")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"{what} {out} cannot be written: {e.strerror or e} in {existing}") from e
