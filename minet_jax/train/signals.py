"""SIGTERM or Ctrl-C during training: save the step just finished, then stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Turns SIGTERM, or a first Ctrl-C (SIGINT), into a flag the loop checks after each
  step (save, then stop); a second Ctrl-C stops at once (KeyboardInterrupt).

  Saving is collective in a multi-process job, so every process must stop after the
  same step: there JAX's preemption notifier catches SIGTERM (on whichever processes
  get it) and `reached` turns True on all of them at one step they agree on.
  """

  def __init__(self):
    self.signal: int | None = None
    self.multi_process = jax.process_count() > 1

  def __bool__(self) -> bool:
    return self.signal is not None

  @property
  def name(self) -> str | None:
    """The signal that asked, e.g. ``"SIGTERM"`` (None while none has)."""
    return None if self.signal is None else signal.Signals(self.signal).name

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process calls it after every step."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return bool(self)

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopRequest]:
    """Catches SIGTERM and Ctrl-C into this request while the block runs (single-process
    runs)."""
    # A Python handler would replace JAX's notifier; and only the main thread may set one.
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      yield self
      return

    def on_term(signum, frame):
      del frame
      self.signal = signum

    def on_interrupt(signum, frame):
      del frame
      if self.signal is not None:  # Asked again: the user will not wait for the save.
        raise KeyboardInterrupt
      self.signal = signum
      print("\nCtrl-C: saving after this step, then stopping (Ctrl-C again stops at once)",
            file=sys.stderr, flush=True)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
                signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt)}
    try:
      yield self
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
