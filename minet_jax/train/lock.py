"""One training run per workdir: an exclusive lock on ``<workdir>/train.lock``.

The lock is a `fcntl.flock` on the file, so the kernel releases it whenever its
holder exits, however it exits (SIGKILL, a crash): a lock left by a dead run is
never in the way. The file records the holder's pid and host, for the message
that refuses a second run. A run removes it when it ends (still holding the lock);
one killed leaves it behind, unlocked, and the next run takes it over.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import socket

from minet_jax.train.checks import ConfigError

LOCK_FILE = "train.lock"


class WorkdirInUseError(ConfigError):
  """Another training run holds the workdir's lock."""


def _holder(fd: int) -> str:
  """The pid (and host) the holder wrote into the lock file."""
  try:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
  except OSError:
    text = []
  if not text:
    return "pid unknown: it is still starting"
  pid, host = text[0], text[1] if len(text) > 1 else "?"
  return f"pid {pid}" + ("" if host == socket.gethostname() else f" on host {host}")


class WorkdirLock:
  """The held lock of one workdir; `release` (or the process's exit) gives it up."""

  def __init__(self, workdir: pathlib.Path, fd: int, created: pathlib.Path | None):
    self.workdir = workdir
    self._fd: int | None = fd
    self._created = created  # The outermost folder acquire created, if any.

  @classmethod
  def acquire(cls, workdir: pathlib.Path) -> WorkdirLock:
    """Creates the workdir if needed and takes its lock.

    Raises `WorkdirInUseError` naming the holder when another run has it, and
    `ConfigError` when the workdir cannot be created or written.
    """
    created = None
    for folder in (workdir, *workdir.parents):
      if os.path.lexists(folder):
        break
      created = folder
    path = workdir / LOCK_FILE
    for _ in range(10):
      try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      except OSError as e:
        raise ConfigError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from e
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirInUseError(f"{workdir} is in use by another training run ({holder}); "
                                "wait for it to end, or use another --workdir") from None
      # The holder removes the file before it lets go: the lock then belongs to a
      # file no longer there, and the next try makes a new one.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    else:
      raise ConfigError(f"could not lock --workdir {workdir}: its {LOCK_FILE} keeps changing")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
      os.close(fd)
      raise ConfigError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from e
    return cls(workdir, fd, created)

  def release(self, *, refused: bool = False) -> None:
    """Removes the lock file and gives up the lock. ``refused``: the start was
    refused; a workdir this run created (left empty) is removed too."""
    if self._fd is None:
      return
    # Removed while still locked, so no other run can be using them; a run that
    # opened the file before sees it is gone once it gets the lock (`acquire`).
    try:
      (self.workdir / LOCK_FILE).unlink(missing_ok=True)
    except OSError:
      pass  # The lock still goes with the descriptor; a stale file is harmless.
    folder = self.workdir
    while refused and self._created is not None:
      try:
        folder.rmdir()  # Only while empty: nothing another program put there goes.
      except OSError:
        break
      if folder == self._created:
        break
      folder = folder.parent
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
