"""Where training reports go: metrics.jsonl, TensorBoard event files, image grids.

Every scalar goes to both ``workdir/metrics.jsonl`` (one JSON object per line,
``{"step": ..., "split": "train" | "eval", ...}``) and TensorBoard event files in
the workdir (tags ``train/loss``, ``eval/psnr``, ...), written with tensorboardX's
protos without TensorFlow: ``tensorboard --logdir WORKDIR``. Only process 0 writes.

Events are written in the calling thread and flushed with each report, not through
tensorboardX's `SummaryWriter`: its writer thread dies on a failed write (a full
disk) and every later event then blocks forever on its full queue, so the run would
hang instead of stopping with the error.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from minet_jax.image_io import to_uint8

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"


def _plain(value: Any) -> Any:
  """JSON-friendly scalars; non-finite floats become strings ("nan", "inf")."""
  if isinstance(value, (np.generic, np.ndarray)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class _EventFile:
  """A TensorBoard event file written in the calling thread (errors raise here)."""

  def __init__(self, logdir: pathlib.Path):
    # Deferred: only the writing process needs tensorboardX.
    from tensorboardX.event_file_writer import EventsWriter
    self._writer = EventsWriter(str(logdir / "events"))

  def add(self, summary: Any, step: int) -> None:
    from tensorboardX.proto import event_pb2
    self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; saves image grids as PNG."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = _EventFile(self.workdir)

  def write_scalars(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    from tensorboardX import summary
    record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    with open(self.workdir / METRICS_FILE, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in scalars.items():
      value = _plain(value)
      if isinstance(value, (int, float)):
        self._tb.add(summary.scalar(f"{split}/{key}", value), step)
    self._tb.flush()

  def write_event(self, step: int, event: str, **fields: Any) -> None:
    """A non-scalar line in metrics.jsonl (start, resume, stop)."""
    if not self.enabled:
      return
    record = {"step": int(step), "event": event, "time": round(time.time(), 3)}
    record.update({k: _plain(v) for k, v in fields.items()})
    with open(self.workdir / METRICS_FILE, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_grid(self, step: int, rows: Sequence[Sequence[np.ndarray]]) -> pathlib.Path | None:
    """Saves ``images/step_XXXXXXX.png`` (and a TensorBoard image) of `rows`."""
    if not self.enabled or not rows:
      return None
    grid = image_grid(rows)
    path = self.workdir / IMAGES_DIR / f"step_{int(step):07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    from tensorboardX import summary
    self._tb.add(summary.image("eval/hazy_dehazed_clear", grid, dataformats="HWC"), step)
    self._tb.flush()
    return path

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def image_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> np.ndarray:
  """Tiles rows of HxWx3 images (e.g. hazy | dehazed | clear) with white gaps."""
  # A diverged model's NaN outputs still make a (black) grid rather than end the run.
  rows = [[to_uint8(np.nan_to_num(im, nan=0.0, posinf=1.0, neginf=0.0)) for im in row]
          for row in rows]
  height = max(im.shape[0] for row in rows for im in row)
  width = max(sum(im.shape[1] for im in row) + gap * (len(row) - 1) for row in rows)
  grid = np.full((len(rows) * height + gap * (len(rows) - 1), width, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    top, left = r * (height + gap), 0
    for im in row:
      grid[top:top + im.shape[0], left:left + im.shape[1]] = im
      left += im.shape[1] + gap
  return grid
