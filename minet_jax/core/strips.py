"""MI-Net's exact forward pass for large images, its row-local stages in row strips.

`MINet.stages` writes the network down as lists of steps. A stage whose steps each
read only nearby rows (layers with a `layers.RowGeometry`, instance norms, pointwise
functions, joins of such layers) runs here on horizontal strips of its output;
the other stages (the residual blocks, each IM-block's solve, the tail with its
global pooling) run on the whole map, as in `MINet.__call__`. For the released
model that puts the encoder up to its stride-2 conv, the fusion and the decoder in
strips, every full-resolution 64-channel map among them. Nothing is approximated:

* A strip's rows at each step are found by walking the steps back from its output
  rows: each layer's geometry says which of its input rows its output rows read
  (rounded down to the start of a stride), so the halo of every step follows from
  the layers after it. Each step runs on those rows, and what is left over after
  it (rows its padding made up at the window's edges) is cropped before the next.
  Rows outside the map are zero before every layer that reads them, which is what
  the layers' zero padding gives the whole map.
* Instance norms use whole-image statistics, taken in passes: a pass computes the
  norm's input strip by strip and combines per-strip means and sums of squared
  deviations (Chan et al.'s pairwise update, float32), and the later passes
  recompute it and normalise it with them (`InstanceNorm.normalize`). Recomputing
  the cheap early layers costs less memory than keeping one full-resolution
  64-channel map.

The result equals the whole-image forward up to float32 rounding (the summation order of
the statistics differs). Every pass is a loop over strips of one shape. Called
eagerly (as `minet_jax.apply` does), `network` runs each stage (and each IM-block) as
its own compiled program, one after the other, each compiled once per image size and
strip height and each with its own scratch memory, so the peak is that of the
largest stage (`stage_memory`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from minet_jax.core import fixed_point as fp
from minet_jax.core.config import ModelConfig, is_count
from minet_jax.core.layers import InstanceNorm, RowGeometry
from minet_jax.core.model import (MINet, Join, Pointwise, Step, from_model_space,
                                  run_steps, to_model_input)

# apply() switches to strips above this many pixels: beyond it the memory the strips
# save outweighs the time their recomputation costs (docs/PRETRAINED.md, "Large photos").
AUTO_PIXELS = 2_000_000
# Default strip size: about this many pixels, i.e. 64 MiB per 64-channel float32 map.
STRIP_PIXELS = 1 << 18

# Per-sample, per-channel (count, mean, sum of squared deviations) of a feature map.
Moments = tuple[jax.Array, jax.Array, jax.Array]


def strip_rows_for(height: int, width: int, strip_rows: int | None = None) -> int:
  """Rows per strip (even, at most `height` rounded up to even) for an image.

  Args:
    height, width: the image size in pixels.
    strip_rows: None for ~`STRIP_PIXELS` per strip; otherwise the requested
      number of rows, rounded up to even (the encoder halves the resolution).
  """
  if strip_rows is None:
    strip_rows = max(8, STRIP_PIXELS // max(width, 1))
  if not is_count(strip_rows):
    raise ValueError(f"strip_rows must be a positive integer, got {strip_rows!r}")
  even_height = height + height % 2
  return min(strip_rows + strip_rows % 2, even_height)


def choose_strip_rows(height: int, width: int, strip_rows: int | None = None) -> int:
  """What `minet_jax.apply` does for an image: 0 (whole image) or rows per strip.

  ``strip_rows`` None: the whole image up to `AUTO_PIXELS` pixels, strips of
  ~`STRIP_PIXELS` beyond; 0: always the whole image; n > 0: strips of n rows.
  """
  if strip_rows is not None and not is_count(strip_rows, 0):
    raise ValueError(f"strip_rows must be an integer >= 0 (0: the whole image at once), "
                     f"got {strip_rows!r}")
  if strip_rows == 0:
    return 0
  if strip_rows is None and height * width <= AUTO_PIXELS:
    return 0
  return strip_rows_for(height, width, strip_rows)


@dataclasses.dataclass(frozen=True)
class _Strips:
  """``height`` rows cut into strips of ``rows``; the last one ends at the bottom edge.

  Strip k computes rows [start(k), start(k) + rows) and owns (counts in statistics)
  those from k * rows on, so every row is owned once even where the last strip
  overlaps its neighbour.
  """
  height: int
  rows: int

  @property
  def count(self) -> int:
    return -(-self.height // self.rows)

  def start(self, k: jax.Array) -> jax.Array:
    return jnp.minimum(k * self.rows, self.height - self.rows)

  def owned(self, k: jax.Array) -> jax.Array:
    """(rows,) bool: which rows of strip k it owns."""
    return self.start(k) + jnp.arange(self.rows) >= k * self.rows

  def moments(self, strip_fn: Callable[[jax.Array], jax.Array]) -> Moments:
    """Whole-image moments of a map given strip by strip (``strip_fn(k)``: its rows)."""
    def body(k, acc):
      return _combine(acc, _strip_moments(strip_fn(k), self.owned(k)))
    shape = jax.eval_shape(strip_fn, 0).shape
    zeros = jnp.zeros((shape[0], shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, self.count, body, (jnp.zeros((), jnp.float32), zeros, zeros))

  def assemble(self, strip_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The whole map from its strips (``strip_fn(k)``: its rows)."""
    first = strip_fn(0)
    # Grown from the first strip rather than a zeros buffer: XLA:CPU schedules an
    # operand-free broadcast at the very start, where it would sit beside the
    # half-resolution middle's maps for nothing.
    out = jnp.pad(first, ((0, 0), (0, self.height - first.shape[1]), (0, 0), (0, 0)))
    def body(k, out):
      return jax.lax.dynamic_update_slice_in_dim(out, strip_fn(k), self.start(k), 1)
    return jax.lax.fori_loop(1, self.count, body, out)


def _strip_moments(x: jax.Array, owned: jax.Array) -> Moments:
  x = x.astype(jnp.float32)
  weight = owned.astype(jnp.float32)[None, :, None, None]
  count = jnp.sum(owned).astype(jnp.float32) * x.shape[2]
  mean = jnp.sum(x * weight, axis=(1, 2)) / count
  m2 = jnp.sum(jnp.square((x - mean[:, None, None, :]) * weight), axis=(1, 2))
  return count, mean, m2


def _combine(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two disjoint sets (Chan, Golub & LeVeque's update)."""
  count_a, mean_a, m2_a = a
  count_b, mean_b, m2_b = b
  count = count_a + count_b
  delta = mean_b - mean_a
  mean = mean_a + delta * (count_b / count)
  m2 = m2_a + m2_b + jnp.square(delta) * (count_a * count_b / count)
  return count, mean, m2


def _statistics(moments: Moments) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance, shaped for `InstanceNorm.normalize`."""
  count, mean, m2 = moments
  return mean[:, None, None, :], (m2 / count)[:, None, None, :]


def _rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """Rows [start, start + size) of an NHWC map; rows outside it are zeros."""
  index = start + jnp.arange(size)
  rows = jnp.take(x, jnp.clip(index, 0, x.shape[1] - 1), axis=1)
  return _zero_outside(rows, start, x.shape[1])


def _zero_outside(x: jax.Array, start: jax.Array, height: int) -> jax.Array:
  """Zeros the rows of a strip (its first row is image row `start`) outside [0, height)."""
  index = start + jnp.arange(x.shape[1])
  inside = (index >= 0) & (index < height)
  return jnp.where(inside[None, :, None, None], x, jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class _JoinGeometry:
  """The rows a row-local `Join` reads: each output row its own row of every input
  and whatever any of its layers reads; its output has its input's size."""
  layers: tuple[RowGeometry, ...]
  scale = Fraction(1)
  phase = 1

  def reads(self, row: int) -> tuple[int, int]:
    ends = [g.reads(row) for g in self.layers]
    return min([row] + [e[0] for e in ends]), max([row] + [e[1] for e in ends])

  def size(self, rows: int) -> int:
    if any(g.scale != 1 or g.size(rows) != rows for g in self.layers):
      raise ValueError("a join's layers must keep the size of the map")
    return rows

  def first_output(self, first_input: int) -> int:
    return first_input


def _row_local(step: Step) -> bool:
  """Whether every output row of `step` depends on a few input rows only (instance
  norms count: they take their statistics from the whole map in a pass of their own)."""
  if isinstance(step, (InstanceNorm, Pointwise)):
    return True
  if isinstance(step, Join):
    return all(hasattr(layer, "row_geometry") for layer in step.layers)
  return hasattr(step, "row_geometry")


def _geometry(step: Step) -> RowGeometry | _JoinGeometry | None:
  """The rows a row-local step reads; None for a step that keeps each row where it is."""
  if isinstance(step, (InstanceNorm, Pointwise)):
    return None
  if isinstance(step, Join):
    return _JoinGeometry(tuple(layer.row_geometry for layer in step.layers))
  return step.row_geometry


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The rows of a row-local step list, relative to its output rows.

  ``scales[i]``: rows of step i's input per output row (one more entry, 1, for the
  output). A strip of output rows [o, o + n) with o and n multiples of `alignment`
  is the strip [0, n) shifted by o * scales[i] rows at step i, rows and strides
  included, so one static plan (`windows`) serves every strip.
  """
  geometries: tuple[RowGeometry | _JoinGeometry | None, ...]
  scales: tuple[Fraction, ...]

  @classmethod
  def of(cls, steps: tuple[Step, ...]) -> _Layout:
    geometries = tuple(_geometry(step) for step in steps)
    scales = [Fraction(1)]
    for g in reversed(geometries):
      scales.append(scales[-1] / (g.scale if g is not None else 1))
    return cls(geometries, tuple(reversed(scales)))

  @property
  def alignment(self) -> int:
    return math.lcm(*(scale.denominator for scale in self.scales))

  def windows(self, stop: int, rows: int) -> list[tuple[int, int]]:
    """The rows [a, b) of its input each step before `stop` runs on, so that the strip
    of output rows [0, `rows`) gets rows [0, scales[stop] * rows) of step stop's input
    exact; then that target."""
    first, end = 0, int(self.scales[stop] * rows)
    windows = [(first, end)]
    for g in reversed(self.geometries[:stop]):
      if g is not None:
        first, last = g.reads(first)[0], g.reads(end - 1)[1]
        first, end = first - first % g.phase, last + 1
      windows.append((first, end))
    return windows[::-1]

  def heights(self, height: int) -> list[int]:
    """The height of each step's input, then of the output, for an input `height` high."""
    heights = [height]
    for g in self.geometries:
      heights.append(g.size(heights[-1]) if g is not None else heights[-1])
    if any(h != scale * heights[-1] for h, scale in zip(heights, self.scales)):
      raise ValueError(f"strips need layers whose output is their input scaled (a "
                       f"zero-padded 'same' conv, or a transposed conv by its stride); "
                       f"got heights {heights}")
    return heights


def halo(steps: tuple[Step, ...]) -> tuple[int, int]:
  """Rows of a row-local stage's input above and below a strip's own rows that the strip
  reads (its own rows: those at the scale of its output rows)."""
  if not all(_row_local(step) for step in steps):
    raise ValueError("a stage with steps that are not row-local runs on the whole map")
  layout = _Layout.of(steps)
  rows = layout.alignment
  first, end = layout.windows(len(steps), rows)[0]
  return -first, end - int(layout.scales[0] * rows)


def _run_strip(steps: tuple[Step, ...], layout: _Layout, heights: list[int], stop: int,
               x: Any, sources: dict[str, jax.Array], moments: dict[int, Moments],
               origin: jax.Array, rows: int) -> jax.Array:
  """Rows [s * origin, s * (origin + rows)) of step `stop`'s input (s = its scale) from
  the input `x`, for the strip whose output rows start at `origin`."""
  windows = layout.windows(stop, rows)

  def shift(i):  # Where the strip's row 0 lies at step i's input.
    return origin * layout.scales[i].numerator // layout.scales[i].denominator

  def crop(x, have, want):
    if have[0] > want[0] or have[1] < want[1]:
      raise ValueError(f"a step gives rows {have} where {want} are needed")
    if have == want:
      return x
    return jax.tree.map(lambda v: v[:, want[0] - have[0]:want[1] - have[0]], x)

  have = windows[0]
  x = jax.tree.map(lambda v: _rows(v, have[0] + shift(0), have[1] - have[0]), x)
  zeroed = True  # Rows outside the map are zeros so far.
  for i, (step, g) in enumerate(zip(steps[:stop], layout.geometries)):
    a, b = windows[i]
    x, have, start = crop(x, have, (a, b)), (a, b), a + shift(i)
    if g is not None and not zeroed and _reads_padding(g, heights[i], heights[i + 1]):
      # The whole map's conv reads zero padding there.
      x = jax.tree.map(lambda v: _zero_outside(v, start, heights[i]), x)
    if isinstance(step, InstanceNorm):
      x = step.normalize(x, *_statistics(moments[i]))
    elif isinstance(step, Join):
      x = step(x, *(_rows(sources[name], start, b - a) for name in step.sources))
    else:
      x = step(x)
    if g is not None:
      have = (g.first_output(a), g.first_output(a) + g.size(b - a))
    zeroed = False
  return crop(x, have, windows[stop])


def _reads_padding(g: RowGeometry | _JoinGeometry, height: int, out_height: int) -> bool:
  """Whether some output row inside the map reads an input row outside it."""
  return g.reads(0)[0] < 0 or g.reads(out_height - 1)[1] >= height


def _in_strips(steps: tuple[Step, ...], x: Any, sources: dict[str, jax.Array],
               rows: int) -> jax.Array:
  """`model.run_steps(steps, x, **sources)` for row-local steps, in strips of `rows`
  output rows (a multiple of `_Layout.alignment`, as is the output height)."""
  layout = _Layout.of(steps)
  heights = layout.heights(jax.tree.leaves(x)[0].shape[1])
  for step, height in zip(steps, heights):
    for name in step.sources if isinstance(step, Join) else ():
      if sources[name].shape[1] != height:
        raise ValueError(f"a join reads {name!r} of {sources[name].shape[1]} rows beside a "
                         f"map of {height}")
  strips = _Strips(heights[-1], rows)
  moments: dict[int, Moments] = {}

  def strip(stop, k):
    return _run_strip(steps, layout, heights, stop, x, sources, moments, strips.start(k), rows)

  for i, step in enumerate(steps):
    if isinstance(step, InstanceNorm):
      # A pass computing the norm's input strip by strip for its statistics.
      scale = layout.scales[i]
      moments[i] = _Strips(heights[i], int(scale * rows)).moments(functools.partial(strip, i))
  return strips.assemble(functools.partial(strip, len(steps)))


def _stage_rows(steps: tuple[Step, ...], x: Any, image_height: int, rows: int) -> int | None:
  """Output rows per strip of a stage for strips of `rows` image rows; None for a stage
  that runs on the whole map."""
  if not all(_row_local(step) for step in steps):
    return None
  layout = _Layout.of(steps)
  height = layout.heights(jax.tree.leaves(x)[0].shape[1])[-1]
  stage_rows = Fraction(rows * height, image_height)
  if stage_rows.denominator != 1 or stage_rows % layout.alignment or height % layout.alignment:
    raise ValueError(f"strips of {rows} rows of a {image_height}-row image give "
                     f"{stage_rows} rows of a {height}-row map, where the steps need a "
                     f"multiple of {layout.alignment}")
  return int(stage_rows)


# progress(done, total): called after each stage of the strip-wise forward.
Progress = Callable[[int, int], None]


def network(model: MINet, image: jax.Array, rows: int, *,
            progress: Progress | None = None, solves: list | None = None) -> jax.Array:
  """MI-Net on a model-space NHWC image (even H and W) with strips of `rows` rows.

  The same function as `MINet.decode(fuse(...), image)` after `MINet.solve_blocks`.
  `rows` must be even and at most the image height. Called eagerly, the stages run
  as separate programs, so one program's scratch never sits beside another's;
  under an enclosing ``jax.jit`` they inline into one program, which XLA:CPU lays
  out in more memory (docs/PERFORMANCE.md has figures).

  ``progress(done, total)`` is called after each stage has finished computing.
  ``solves``, when a list, receives each IM-block's `fixed_point.SolveSummary`.
  """
  height = image.shape[1]
  if rows < 2 or rows % 2 or rows > height or height % 2 or image.shape[2] % 2:
    raise ValueError(f"strips need even image sides and an even strip height <= the "
                     f"image height; got image {image.shape[1:3]}, rows {rows}")
  if progress is None:
    return _run_stages(model, image, rows, lambda name, stage, args, held: stage(*args),
                       solves)
  total, done = stage_count(model), 0

  def call_and_report(name, stage, args, held):
    nonlocal done
    out = jax.block_until_ready(stage(*args))
    done += 1
    progress(done, total)
    return out

  return _run_stages(model, image, rows, call_and_report, solves)


def stage_count(model: MINet) -> int:
  """How many stages `_run_stages` runs: the model's stages (`MINet.stages`) and each
  IM-block."""
  return len(model.stages()) + len(model.im_blocks)


# How `_run_stages` runs one stage: call(name, jitted stage, its arguments, the arrays
# the sequence holds for later stages meanwhile) -> the stage's output.
_StageCall = Callable[[str, Callable, tuple, tuple], jax.Array]


def _run_stages(model: MINet, image: jax.Array, rows: int, call: _StageCall,
                solves: list | None = None) -> jax.Array:
  """The sequence of compiled stages behind `network` (`stage_memory` replays it);
  each IM-block's solve summary goes to ``solves`` when it is a list."""
  graphdef, state = nnx.split(model)
  stages = model.stages()

  def run(name, x, held, **sources):
    strip_rows = _stage_rows(stages[name], x, image.shape[1], rows)
    return call(name, _stage, (graphdef, state, name, x, sources, strip_rows), held)

  x = run("encoder", image, ())
  x = run("pre_processing", x, (image,))
  states = []
  for index in range(len(model.im_blocks)):
    held = (image, *states[:-1])  # The last state is this block's argument.
    x, summary = call(f"im_block_{index + 1}", _im_block_stage, (graphdef, state, index, x),
                      held)
    if solves is not None:
      solves.append(summary)
    states.append(x)
  fused = run("fusion", tuple(states), (image,))
  del x, states  # Free the block outputs before the decoder runs.
  x = run("decoder", fused, (), image=image)
  del fused
  return run("tail", x, ())


def stage_memory(cfg: ModelConfig, shape: tuple[int, int, int, int], rows: int
                 ) -> dict[str, int]:
  """Bytes each stage of the strip-wise forward needs, from XLA's compiled memory analysis.

  Args:
    cfg: the architecture.
    shape: the NHWC batch of RGB images (any H, W).
    rows: rows per strip (as `strip_rows_for` returns them).

  Returns:
    {stage: arguments + outputs + temporaries - aliased + arrays held for later
    stages}. Nothing is executed or allocated. Scratch that XLA's runtime
    allocates outside its buffer assignment (some convolutions take some) is not
    included.
  """
  model = nnx.eval_shape(lambda: MINet(cfg, rngs=nnx.Rngs(0)))
  n, h, w, _ = shape
  image = jax.ShapeDtypeStruct((n, h + h % 2, w + w % 2, 3), jnp.dtype(cfg.dtype))
  report = {}

  def measure(name, stage, args, held):
    lowered = stage.lower(*args)
    stats = lowered.compile().memory_analysis()
    report[name] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                    + stats.temp_size_in_bytes - stats.alias_size_in_bytes
                    + sum(x.size * x.dtype.itemsize for x in held))
    return lowered.out_info

  _run_stages(model, image, rows, measure)
  return report


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _stage(graphdef: nnx.GraphDef, state: nnx.State, name: str, x: Any,
           sources: dict[str, jax.Array], rows: int | None) -> jax.Array:
  """The model's stage `name` on `x`: in strips of `rows` output rows, or whole (None)."""
  steps = nnx.merge(graphdef, state).stages()[name]
  if rows is None:
    return run_steps(steps, x, **sources)
  return _in_strips(steps, x, sources, rows)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _im_block_stage(graphdef: nnx.GraphDef, state: nnx.State, index: int,
                    x: jax.Array) -> tuple[jax.Array, fp.SolveSummary]:
  run = nnx.merge(graphdef, state).im_blocks[index].run(x)
  return run.output, run.summary


def forward(model: MINet, rgb: jax.Array, rows: int, *,
            progress: Progress | None = None, solves: list | None = None) -> jax.Array:
  """``model(rgb)`` (RGB [0, 1] NHWC, any H, W) with the strip-wise network.

  `rows` is as `strip_rows_for` returns it for the image (even, <= the padded height);
  ``progress`` and ``solves`` as in `network`.
  """
  h, w = rgb.shape[1:3]
  out = network(model, _to_network_input(model.config, rgb), rows, progress=progress,
                solves=solves)
  return _from_network_output(model.config, out, h, w)


@functools.partial(jax.jit, static_argnums=0)
def _to_network_input(cfg: ModelConfig, rgb: jax.Array) -> jax.Array:
  return to_model_input(rgb, cfg)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _from_network_output(cfg: ModelConfig, out: jax.Array, h: int, w: int) -> jax.Array:
  return from_model_space(out.astype(jnp.float32), cfg)[:, :h, :w, :]
