"""SIGTERM during training: save the step just finished, then stop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Turns SIGTERM into a flag the loop checks after each step (save, then stop).

  Saving is collective in a multi-process job, so every process must stop after the
  same step: there JAX's preemption notifier catches SIGTERM (on whichever processes
  get it) and `reached` turns True on all of them at one step they agree on.
  """

  def __init__(self):
    self.signal: int | None = None
    self.multi_process = jax.process_count() > 1

  def __bool__(self) -> bool:
    return self.signal is not None

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process calls it after every step."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return bool(self)

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopRequest]:
    """Catches SIGTERM into this request while the block runs (single-process runs)."""
    # A Python handler would replace JAX's notifier; and only the main thread may set one.
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      yield self
      return

    def handler(signum, frame):
      del frame
      self.signal = signum

    previous = signal.signal(signal.SIGTERM, handler)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)
