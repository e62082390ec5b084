"""MI-Net's exact forward pass for large images, its full-resolution stages in row strips.

At full resolution MI-Net holds 64-channel maps (1.25 GB each in float32 at
2708x1800): conv1 and conv2 of the encoder with their instance norms, the stride-2
conv3 that reads them, and in the decoder deconv3 (the 2x transposed conv),
norm4, deconv2, norm5 and deconv1. Here those stages run on horizontal strips of
``rows`` image rows plus a halo of neighbouring rows, so only strip-sized
64-channel maps exist at full resolution; the half-resolution middle (residual
blocks, IM-blocks) runs on the whole image as in `MINet.__call__`, and so do the
3-channel tail and its global pooling. Nothing is approximated:

* Each strip calls the model's own layer modules on its rows plus the halo, and
  keeps the rows the halo makes exact. Rows outside the image are zero before
  every convolution, which is what the modules' zero padding gives the whole image.
* Instance norms use whole-image statistics, taken in passes: a pass computes a
  conv's output strip by strip and combines per-strip means and sums of squared
  deviations (Chan et al.'s pairwise update, float32), the next pass recomputes
  that conv and normalises it with them. Recomputing the cheap early layers costs
  less memory than keeping one full-resolution 64-channel map.

The result equals the whole-image forward up to float32 rounding (the summation order of
the statistics differs). Every pass is a loop over strips of one shape. Called
eagerly (as `minet_jax.apply` does), the network runs as eight compiled stages, one
after the other (encoder, residual blocks, each IM-block, fusion, decoder, tail),
each compiled once per image size and strip height and each with its own scratch
memory, so the peak is that of the largest stage: the third IM-block, with five
half-resolution 64-channel maps alive (a quarter of a full-resolution map each).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from minet_jax.core import fixed_point as fp
from minet_jax.core.config import ModelConfig
from minet_jax.core.layers import InstanceNorm
from minet_jax.core.model import MINet, from_model_space, to_model_input

# apply() switches to strips above this many pixels: there the whole-image forward
# would need more than ~3.5 GB, and the strips' recomputation (~20-30% more time) pays.
AUTO_PIXELS = 2_000_000
# Default strip size: about this many pixels, i.e. 64 MiB per 64-channel float32 map.
STRIP_PIXELS = 1 << 18
# Halos. Encoder, in full-resolution rows: conv1, conv2 and the stride-2 conv3 each
# reach one row, and the halo must be even so the strip keeps conv3's stride phase.
_ENCODER_HALO = 4
# Decoder, in half-resolution rows: an output row of the 4x4 stride-2 transposed conv
# reads two input rows, and deconv2 (3x3) one more full-resolution row, which the same
# half-resolution row covers.
_DECODER_HALO = 1
# The gate of the fusion is a 3x3 conv on half-resolution maps.
_FUSE_HALO = 1

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
  if isinstance(strip_rows, bool) or not isinstance(strip_rows, int) or strip_rows < 1:
    raise ValueError(f"strip_rows must be a positive integer, got {strip_rows!r}")
  even_height = height + height % 2
  return min(strip_rows + strip_rows % 2, even_height)


def choose_strip_rows(height: int, width: int, strip_rows: int | None = None) -> int:
  """What `minet_jax.apply` does for an image: 0 (whole image) or rows per strip.

  ``strip_rows`` None: the whole image up to `AUTO_PIXELS` pixels, strips of
  ~`STRIP_PIXELS` beyond; 0: always the whole image; n > 0: strips of n rows.
  """
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

  def assemble(self, strip_fn: Callable[[jax.Array], jax.Array], scale: int = 1) -> jax.Array:
    """The whole map from its strips (``strip_fn(k)``: rows/scale rows at start(k)/scale)."""
    first = strip_fn(0)
    # Grown from the first strip rather than a zeros buffer: XLA:CPU schedules an
    # operand-free broadcast at the very start, where it would sit beside the
    # half-resolution middle's maps for nothing.
    out = jnp.pad(first, ((0, 0), (0, self.height // scale - first.shape[1]), (0, 0), (0, 0)))
    def body(k, out):
      return jax.lax.dynamic_update_slice_in_dim(out, strip_fn(k), self.start(k) // scale, 1)
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


def _normalize(norm: InstanceNorm, x: jax.Array, moments: Moments) -> jax.Array:
  """`norm` applied to part of a map with the whole map's `moments` (InstanceNorm's formula)."""
  count, mean, m2 = moments
  var = (m2 / count)[:, None, None, :]
  y = (x.astype(jnp.float32) - mean[:, None, None, :]) * jax.lax.rsqrt(var + norm.eps)
  return (y * norm.scale[...] + norm.bias[...]).astype(x.dtype)


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


def _encode(model: MINet, image: jax.Array, rows: int) -> jax.Array:
  """conv1-norm1-relu-conv2-norm2-relu-conv3 of a model-space image, in strips.

  Returns conv3's half-resolution output (before norm3).
  """
  height = image.shape[1]
  strips, halo = _Strips(height, rows), _ENCODER_HALO
  inner = slice(halo, halo + rows)

  def conv1(k):
    start = strips.start(k) - halo
    return start, model.conv1(_rows(image, start, rows + 2 * halo))

  moments1 = strips.moments(lambda k: conv1(k)[1][:, inner])

  def conv2(k):
    start, a = conv1(k)
    a = _zero_outside(jax.nn.relu(_normalize(model.norm1, a, moments1)), start, height)
    return start, model.conv2(a)

  moments2 = strips.moments(lambda k: conv2(k)[1][:, inner])

  def conv3(k):
    start, a = conv2(k)
    a = _zero_outside(jax.nn.relu(_normalize(model.norm2, a, moments2)), start, height)
    return model.conv3(a)[:, halo // 2:(halo + rows) // 2]

  return strips.assemble(conv3, scale=2)


def _fuse(model: MINet, states: list[jax.Array], rows: int) -> jax.Array:
  """`MINet.fuse` of half-resolution maps, in strips (no 3x-wide concatenation)."""
  strips, halo = _Strips(states[0].shape[1], rows), _FUSE_HALO

  def fuse(k):
    start = strips.start(k) - halo
    return model.fuse([_rows(s, start, rows + 2 * halo) for s in states])[:, halo:halo + rows]

  return strips.assemble(fuse)


def _decode(model: MINet, fused: jax.Array, image: jax.Array, rows: int) -> jax.Array:
  """`MINet.decode` up to its gate, in strips: deconv3-norm4-relu-deconv2-norm5-relu-
  deconv1, then leaky_relu(conv_su1(that) + conv_su2(image)).

  Returns that full-resolution 3-channel map. (conv_su2 runs here, strip by strip,
  rather than on the whole image: XLA would compute it first, its input being
  ready, and hold the result through the whole network.)
  """
  height = 2 * fused.shape[1]
  strips, halo = _Strips(height, rows), _DECODER_HALO
  inner = slice(2 * halo, 2 * halo + rows)

  def deconv3(k):
    start = strips.start(k) // 2 - halo
    return 2 * start, model.deconv3(_rows(fused, start, rows // 2 + 2 * halo))

  moments4 = strips.moments(lambda k: deconv3(k)[1][:, inner])

  def deconv2(k):
    start, a = deconv3(k)
    a = _zero_outside(jax.nn.relu(_normalize(model.norm4, a, moments4)), start, height)
    return model.deconv2(a)[:, inner]

  moments5 = strips.moments(deconv2)

  def tail(k):
    x = model.deconv1(jax.nn.relu(_normalize(model.norm5, deconv2(k), moments5)))
    source = jax.lax.dynamic_slice_in_dim(image, strips.start(k), rows, 1)
    return jax.nn.leaky_relu(model.conv_su1(x) + model.conv_su2(source),
                             negative_slope=model.config.leaky_slope)

  return strips.assemble(tail)


# progress(done, total): called after each stage of the strip-wise forward.
Progress = Callable[[int, int], None]


def network(model: MINet, image: jax.Array, rows: int, *,
            progress: Progress | None = None, solves: list | None = None) -> jax.Array:
  """MI-Net on a model-space NHWC image (even H and W) with strips of `rows` rows.

  The same function as `MINet.decode(fuse(...), image)` after `MINet.solve_blocks`.
  `rows` must be even and at most the image height. Called eagerly, the stages run
  as separate programs, so one program's scratch never sits beside another's;
  under an enclosing ``jax.jit`` they inline into one program, which XLA:CPU lays
  out in more memory (at 2708x1800, 1.86 GiB of buffers against the largest
  stage's 1.51 GiB; ~2.9 GiB peak RSS against ~2.0 GiB).

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
  """How many stages `_run_stages` runs: encode, pre-processing, each IM-block, fuse,
  decode and tail."""
  return len(model.im_blocks) + 5


# How `_run_stages` runs one stage: call(name, jitted stage, its arguments, the arrays
# the sequence holds for later stages meanwhile) -> the stage's output.
_StageCall = Callable[[str, Callable, tuple, tuple], jax.Array]


def _run_stages(model: MINet, image: jax.Array, rows: int, call: _StageCall,
                solves: list | None = None) -> jax.Array:
  """The sequence of compiled stages behind `network` (`stage_memory` replays it);
  each IM-block's solve summary goes to ``solves`` when it is a list."""
  graphdef, state = nnx.split(model)
  x = call("encode", _encode_stage, (graphdef, state, image, rows), ())
  x = call("pre_processing", _pre_processing_stage, (graphdef, state, x), (image,))
  states = []
  for index in range(len(model.im_blocks)):
    held = (image, *states[:-1])  # The last state is this block's argument.
    x, summary = call(f"im_block_{index + 1}", _im_block_stage, (graphdef, state, index, x),
                      held)
    if solves is not None:
      solves.append(summary)
    states.append(x)
  fused = call("fuse", _fuse_stage, (graphdef, state, tuple(states), rows // 2), (image,))
  del x, states  # Free the block outputs before the decoder runs.
  x = call("decode", _decode_stage, (graphdef, state, fused, image, rows), ())
  del fused
  return call("tail", _tail_stage, (graphdef, state, x), ())


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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_stage(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array,
                  rows: int) -> jax.Array:
  return _encode(nnx.merge(graphdef, state), image, rows)


@functools.partial(jax.jit, static_argnums=0)
def _pre_processing_stage(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  x = jax.nn.relu(model.norm3(x))
  for block in model.pre_processing:
    x = block(x)
  return x


@functools.partial(jax.jit, static_argnums=(0, 2))
def _im_block_stage(graphdef: nnx.GraphDef, state: nnx.State, index: int,
                    x: jax.Array) -> tuple[jax.Array, fp.SolveSummary]:
  result = nnx.merge(graphdef, state).im_blocks[index].solve(x)
  return result.value, fp.SolveSummary.of(result)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _fuse_stage(graphdef: nnx.GraphDef, state: nnx.State, states: tuple[jax.Array, ...],
                rows: int) -> jax.Array:
  return _fuse(nnx.merge(graphdef, state), list(states), rows)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode_stage(graphdef: nnx.GraphDef, state: nnx.State, fused: jax.Array,
                  image: jax.Array, rows: int) -> jax.Array:
  return _decode(nnx.merge(graphdef, state), fused, image, rows)


@functools.partial(jax.jit, static_argnums=0)
def _tail_stage(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
  # The rest of `MINet.decode`'s 3-channel tail; its gate pools over the whole image.
  model = nnx.merge(graphdef, state)
  x = x + x * model.layer1(x)
  return model.deconv(x)


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
