"""MI-Net (Shen et al., CVPRW 2020) in Flax NNX, NHWC.

Data flow, with the authors' layer names (Jiawei-Shen/MI-Net, ``MINet.py``):

  encoder   conv1-norm1-relu, conv2-norm2-relu, conv3(stride 2)-norm3-relu,
            pre_processing: residual blocks (conv-IN-relu-conv-IN, + input, relu)
  IM-blocks x1 = IM_1(x), x2 = IM_2(x1), x3 = IM_3(x2); block i solves
            g = g0 + eta * f_i(g) from g = g0 = its input (fixed_point.py), or the
            stage k = g0 + s_i * eta * f_i(k) and answers g0 + eta * f_i(k)
            (`ModelConfig.stage_fraction`), or two stages of one step
            (`ModelConfig.stages`)
  MLF       gate: 3x3 conv on concat(x1, x2, x3) -> 3 maps; fused = sum_i W_i * x_i
  decoder   deconv3 (transposed 4x4, stride 2)-norm4-relu, deconv2-norm5-relu, deconv1 (1x1)
  tail      ("RCA" as released) x = LeakyReLU(conv_su1(x) + conv_su2(input));
            psi = sigmoid(fc2(fc1(GAP(layer1.conv(x))))); x = x + x * psi; deconv (1x1)

Block f_i is conv-IN-relu-conv-IN-relu with no skip; its first conv is dilated by d_i
and, when `smoothed_dilation` and d_i > 1, each conv is preceded by a shared
(2d-1)x(2d-1) smoothing kernel (``pre_conv1``/``pre_conv2``).

`MINet.stages` writes this data flow down once, as lists of steps (the layer modules,
pointwise functions, and `Join` for steps with several inputs or layers); the
whole-image forward runs them with `run_steps`, and `minet_jax.core.strips` runs
them strip by strip.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minet_jax.core import fixed_point as fp
from minet_jax.core.config import ModelConfig
from minet_jax.core.layers import Conv2d, ConvTranspose2d, InstanceNorm, Scalar, ShareSepConv

# The released model was trained on raw BGR pixel values, with no mean subtraction.
_BGR255_SCALE = 255.0


class ResidualBlock(nnx.Module):
  """Encoder residual block: relu(x + IN(conv(relu(IN(conv(x))))))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    c = cfg.features
    conv = dict(padding=1, use_bias=False, init_a=cfg.init_kaiming_a, dtype=cfg.dtype,
                precision=cfg.precision, backend=cfg.conv_backend, rngs=rngs)
    self.conv1 = Conv2d(c, c, 3, **conv)
    self.norm1 = InstanceNorm(c, eps=cfg.norm_eps)
    self.conv2 = Conv2d(c, c, 3, **conv)
    self.norm2 = InstanceNorm(c, eps=cfg.norm_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.relu(x + self.norm2(self.conv2(y)))


class IMBlockF(nnx.Module):
  """The f of one IM-block: [smooth]-dilated conv-IN-relu, [smooth]-conv-IN-relu, no skip."""

  def __init__(self, cfg: ModelConfig, dilation: int, *, rngs: nnx.Rngs):
    c = cfg.features
    smoothed = cfg.smoothed_dilation and dilation > 1
    conv = dict(use_bias=False, init_a=cfg.init_kaiming_a, dtype=cfg.dtype,
                precision=cfg.precision, backend=cfg.conv_backend, rngs=rngs)
    self.pre_conv1 = ShareSepConv(2 * dilation - 1, dtype=cfg.dtype,
                                  backend=cfg.conv_backend) if smoothed else None
    self.conv1 = Conv2d(c, c, 3, padding=dilation, dilation=dilation, **conv)
    self.norm1 = InstanceNorm(c, eps=cfg.norm_eps)
    self.pre_conv2 = ShareSepConv(2 * dilation - 1, dtype=cfg.dtype,
                                  backend=cfg.conv_backend) if smoothed else None
    self.conv2 = Conv2d(c, c, 3, padding=1, **conv)
    self.norm2 = InstanceNorm(c, eps=cfg.norm_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pre_conv1 is not None:
      x = self.pre_conv1(x)
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    if self.pre_conv2 is not None:
      y = self.pre_conv2(y)
    return jax.nn.relu(self.norm2(self.conv2(y)))


class IMBlock(nnx.Module):
  """One implicit step of the ODE dg/dt = f(g) from g0, its stages solved by `fixed_point`.

  With one stage (`ModelConfig.stages`) the block solves k = g0 + s * eta * f(k),
  s = `ModelConfig.stage_fraction`, and answers g0 + eta * f(k); with the default
  fraction 1 that is the implicit Euler step x_out = x_in + eta * f(x_out) of the paper,
  and the answer is k. With two stages (a stiffly accurate SDIRK step, both stages at
  the fraction G = s < 1) it solves k1 = g0 + G eta f(k1), then y = c + G eta f(y)
  with c = g0 + (1 - G) eta f(k1), and answers y. Every stage is a fixed point of the
  same map T(g; base) = base + s eta f(g) (`map_fn`), with its own base. The solver and
  adjoint objects are built from the config (`fixed_point.from_config`); each sample of
  a batch is its own fixed-point problem (instance norm keeps them independent).
  """

  def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs):
    self.f = IMBlockF(cfg, cfg.dilations[index], rngs=rngs)
    self.iterations = cfg.iterations[index]
    self.eta = cfg.eta
    self.stage_fraction = cfg.stage_fraction[index]
    self.num_stages = cfg.stages[index]
    # The solved map's step: eta for implicit Euler (stage_fraction 1), s * eta for a stage.
    self.step = cfg.eta * self.stage_fraction
    self.solver, self.adjoint = fp.from_config(cfg)

  def map_fn(self):
    """The solved map as ``(T, args)``: T(g, args) = base + stage_fraction * eta * f(g),
    args = (base, f's state); the base is g0 for the first stage.

    Splitting f into graph and state makes its parameters explicit inputs of T, so
    the implicit backward can return their gradients.
    """
    graphdef, state = nnx.split(self.f)
    step = self.step

    def implicit_euler_map(g, args):
      base, f_state = args
      return base + step * nnx.merge(graphdef, f_state)(g)

    return implicit_euler_map, state

  def _solve(self, start: jax.Array, base: jax.Array, adjoint: fp.Adjoint, *,
             constant: bool = False) -> fp.FixedPointResult:
    """One stage's solve: the fixed point of T(g; base) from ``start``; with ``constant``,
    f's parameters are constants of it."""
    implicit_euler_map, state = self.map_fn()
    if constant:
      state = jax.lax.stop_gradient(state)
    return fp.fixed_point(implicit_euler_map, self.solver, start, (base, state),
                          max_steps=self.iterations, adjoint=adjoint, per_sample=True)

  def _step_at(self, g0: jax.Array, k: jax.Array, *, evaluate: bool = False) -> jax.Array:
    """eta * f(k) at a solved stage k of base g0: in float32 (k - g0) / s, equal at the
    stage's solution and one evaluation of f cheaper; f itself in a narrow dtype, where
    dividing by s would magnify the stage's rounding by 1 / s. With ``evaluate`` the
    same value, differentiated as one evaluation of f (to train f through it)."""
    if k.dtype != jnp.float32:
      return self.eta * self.f(k)
    read_off = (k - g0) / self.stage_fraction
    if not evaluate:
      return read_off
    evaluated = self.eta * self.f(k)
    return evaluated + jax.lax.stop_gradient(read_off - evaluated)

  def _second_base(self, g0: jax.Array, k1: jax.Array, *, evaluate: bool = False) -> jax.Array:
    """The second stage's base c = g0 + (1 - G) eta f(k1) (`_step_at`)."""
    step = self._step_at(g0, k1, evaluate=evaluate)
    return g0 + jnp.asarray(1.0 - self.stage_fraction, step.dtype) * step

  def solve_stages(self, g0: jax.Array) -> list[tuple[jax.Array, fp.FixedPointResult]]:
    """Runs the block's solver on each stage in turn: one ``(base, result)`` per stage,
    diagnostics with a leading batch axis. The first stage starts from g0; a second
    from the one-stage answer g0 + eta f(k1)."""
    first = self._solve(g0, g0, self.adjoint)
    if self.num_stages == 1:
      return [(g0, first)]
    k1 = first.value
    base = self._second_base(g0, k1)
    return [(g0, first), (base, self._solve(g0 + self._step_at(g0, k1), base, self.adjoint))]

  def solve(self, g0: jax.Array) -> fp.FixedPointResult:
    """The block's solve from g0 (`solve_stages`) as one result (`combined`): ``value``
    is the last stage's solution (`output` turns it into the block's answer)."""
    return combined([result for _, result in self.solve_stages(g0)])

  def output(self, g0: jax.Array, stage: jax.Array) -> jax.Array:
    """The block's answer from its last stage's solution: for one stage g0 + eta * f(k)
    (`_step_at`; the stage itself for implicit Euler); for two stages (stiffly
    accurate) the second stage itself."""
    if self.stage_fraction == 1.0 or self.num_stages == 2:
      return stage
    return g0 + self._step_at(g0, stage)

  def stage_of(self, g0: jax.Array, output: jax.Array) -> jax.Array:
    """The stage k whose `output` is ``output`` (its inverse, one-stage blocks):
    g0 + stage_fraction * (y - g0)."""
    if self.num_stages != 1:
      raise ValueError("stage_of inverts a one-stage block's answer; a two-stage block's "
                       "stages come from stage_points")
    if self.stage_fraction == 1.0:
      return output
    return g0 + jnp.asarray(self.stage_fraction, output.dtype) * (output - g0)

  def stage_points(self, g0: jax.Array, output: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Each stage's ``(base, solution)`` in the step that answers ``output`` from ``g0``.

    One stage: ``[(g0, stage_of(g0, output))]``. Two: ``[(g0, k1), (c, output)]``, k1
    solved from g0 by the block's solver (a constant for differentiation) and c the
    forward pass's base (`solve_stages`), with the derivative of one evaluation of f at
    k1 (so c carries f's parameters, as Jacobian-free backprop does; g0 is a constant).
    The value matters where stage 1 stops short of its solution: the forward's c reads
    f(k1) off the stage, (k1 - g0) / G, which differs from f(k1) by stage 1's residual
    / G. The last pair is where the step's final stage equation must hold.
    """
    if self.num_stages == 1:
      return [(g0, self.stage_of(g0, output))]
    g0 = jax.lax.stop_gradient(g0)
    k1 = jax.lax.stop_gradient(self._solve(g0, g0, fp.Backprop(), constant=True).value)
    return [(g0, k1), (self._second_base(g0, k1, evaluate=True), output)]

  def run(self, g0: jax.Array) -> BlockRun:
    """The block's solve from g0 with all that the network and its reports read from it:
    the stages' solves `combined`, the answer, each stage's point and summary."""
    stages = self.solve_stages(g0)
    result = combined([r for _, r in stages])
    return BlockRun(g0, result, self.output(g0, result.value),
                    tuple((base, r.value) for base, r in stages),
                    tuple(fp.SolveSummary.of(r) for _, r in stages))

  def __call__(self, g0: jax.Array) -> jax.Array:
    return self.output(g0, self.solve(g0).value)


def combined(results: list[fp.FixedPointResult]) -> fp.FixedPointResult:
  """The solves of one block's stages, in order, as one `FixedPointResult` (`IMBlock.solve`):
  the last stage's ``value``; the map evaluations of all of them; the worse status and
  final residual; and one residual history per sample, each stage's residuals right
  after the previous stage's (NaN after the last, the length all their caps together)."""
  if len(results) == 1:
    return results[0]
  history, taken = results[0].residual_history, results[0].num_steps
  for r in results[1:]:
    length = history.shape[-1] + r.residual_history.shape[-1]
    padded = [jnp.concatenate([h, jnp.full(h.shape[:-1] + (length - h.shape[-1],), jnp.nan,
                                           h.dtype)], axis=-1)
              for h in (history, r.residual_history)]
    j = jnp.arange(length)
    shifted = jnp.take_along_axis(
        padded[1], jnp.clip(j - taken[..., None], 0, length - 1), axis=-1)
    history = jnp.where(j < taken[..., None], padded[0], shifted)
    taken = taken + r.num_steps
  return fp.FixedPointResult(
      value=results[-1].value,
      status=functools.reduce(jnp.maximum, [r.status for r in results]),
      num_steps=taken,
      residual=functools.reduce(jnp.maximum, [r.residual for r in results]),
      residual_history=history)


class RCAGate(nnx.Module):
  """The released "RCA" channel gate on the 3-channel image: sigmoid(fc2(fc1(GAP(conv(x)))))."""

  def __init__(self, channels: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 1, init_a=cfg.init_kaiming_a, dtype=cfg.dtype,
                       precision=cfg.precision, backend=cfg.conv_backend, rngs=rngs)
    self.fc1 = Scalar(rngs=rngs)
    self.fc2 = Scalar(rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = jnp.mean(self.conv(x).astype(jnp.float32), axis=(1, 2), keepdims=True)
    return jax.nn.sigmoid(self.fc2(self.fc1(pooled))).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Pointwise:
  """A step that maps every pixel on its own (an activation): ``fn(x)``."""

  fn: Callable[[jax.Array], jax.Array]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


RELU = Pointwise(jax.nn.relu)


@dataclasses.dataclass(frozen=True)
class Join:
  """A step with several layers, or with inputs besides the running map x:
  ``fn(x, *(inputs[name] for name in sources))``, the sources given by name to `run_steps`.

  `fn` reaches the pixels of its inputs through `layers` and, at most, each output
  pixel's own input pixel; sources have the running map's size. With every layer
  row-local (a ``row_geometry``) an output row reads its own row plus what any of
  them reads; otherwise (global pooling) the join needs the whole map.
  """

  fn: Callable[..., jax.Array]
  layers: tuple[nnx.Module, ...] = ()
  sources: tuple[str, ...] = ()

  def __call__(self, x: Any, *sources: jax.Array) -> jax.Array:
    return self.fn(x, *sources)


# One step of a stage: a layer module (or any module mapping a map to a map), an
# `InstanceNorm`, a `Pointwise` function or a `Join`.
Step = nnx.Module | Pointwise | Join


def run_steps(steps: tuple[Step, ...], x: Any, **sources: jax.Array) -> jax.Array:
  """Runs a stage's `steps` on the whole map `x`; `sources` feed the joins."""
  for step in steps:
    x = step(x, *(sources[name] for name in step.sources)) if isinstance(step, Join) else step(x)
  return x


class BlockRun(NamedTuple):
  """One IM-block inside the network (`MINet.solve_blocks`)."""
  g0: jax.Array  # The block's input: the encoder output or the previous block's output.
  result: fp.FixedPointResult  # Its solve (`IMBlock.solve`); ``value``: its last stage.
  output: jax.Array  # The block's answer (`IMBlock.output`), the next block's g0.
  # Every stage's (base, solution): where each stage map is linearised (Theorem 1).
  points: tuple[tuple[jax.Array, jax.Array], ...]
  # Every stage's own solve, summarised (`result` is them `combined`; their values are
  # in `points`).
  stage_solves: tuple[fp.SolveSummary, ...]

  @property
  def summary(self) -> fp.SolveSummary:
    """What a user sees of the block's solve: the stages' together and each stage's."""
    return fp.SolveSummary.of(self.result, self.stage_solves)

  @property
  def stage_steps(self) -> tuple[jax.Array, ...]:
    """Every stage's map evaluations per sample: where each stage's solve stopped."""
    return tuple(r.num_steps for r in self.stage_solves)


class MINet(nnx.Module):
  """MI-Net. Call on NHWC RGB images in [0, 1]; returns NHWC RGB in [0, 1] scale, unclipped.

  Two input spaces: the public entry points (``__call__``,
  `forward_rgb_with_diagnostics`) take RGB in [0, 1] with any H and W; the stage
  methods (`encode`, `solve_blocks`, `fuse`, `decode`) work in model space, the image as the
  first layer sees it (`to_model_space`: BGR 0..255 for the released weights, see
  ``config.input_format``) with even H and W, which `model_input` produces.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    c, a, dt = cfg.features, cfg.init_kaiming_a, cfg.dtype
    conv = dict(init_a=a, dtype=dt, precision=cfg.precision, backend=cfg.conv_backend, rngs=rngs)
    self.conv1 = Conv2d(3, c, 3, padding=1, use_bias=False, **conv)
    self.norm1 = InstanceNorm(c, eps=cfg.norm_eps)
    self.conv2 = Conv2d(c, c, 3, padding=1, use_bias=False, **conv)
    self.norm2 = InstanceNorm(c, eps=cfg.norm_eps)
    self.conv3 = Conv2d(c, c, 3, stride=2, padding=1, use_bias=False, **conv)
    self.norm3 = InstanceNorm(c, eps=cfg.norm_eps)
    self.pre_processing = nnx.List([ResidualBlock(cfg, rngs=rngs) for _ in range(cfg.pre_blocks)])
    self.im_blocks = nnx.List([IMBlock(cfg, i, rngs=rngs) for i in range(cfg.num_blocks)])
    self.gate = Conv2d(c * cfg.num_blocks, cfg.num_blocks, 3, padding=1, **conv)
    self.deconv3 = ConvTranspose2d(c, c, 4, stride=2, padding=1, dtype=dt,
                                   precision=cfg.precision, backend=cfg.conv_backend, rngs=rngs)
    self.norm4 = InstanceNorm(c, eps=cfg.norm_eps)
    self.deconv2 = Conv2d(c, c, 3, padding=1, **conv)
    self.norm5 = InstanceNorm(c, eps=cfg.norm_eps)
    self.deconv1 = Conv2d(c, 3, 1, **conv)
    self.conv_su1 = Conv2d(3, 3, 1, **conv)
    self.conv_su2 = Conv2d(3, 3, 1, **conv)
    self.layer1 = RCAGate(3, cfg, rngs=rngs)
    self.deconv = Conv2d(3, 3, 1, **conv)

  def model_input(self, rgb: jax.Array) -> jax.Array:
    """RGB [0, 1] NHWC (any H, W) -> the model-space image the stages take.

    Odd sides are padded by one row/column (``config.pad_mode``): one stride-2
    encoder conv and one 2x transposed conv round-trip even sizes exactly.
    """
    return to_model_input(rgb, self.config)

  def stages(self) -> dict[str, tuple[Step, ...]]:
    """The network as steps, stage by stage, in the order they run; the IM-blocks'
    solves (`solve_blocks`) run between "pre_processing" and "fusion".

    * encoder: the full-resolution part, up to the stride-2 conv3 (model-space image
      -> half-resolution map);
    * pre_processing: conv3's norm, then the residual blocks (half resolution);
    * fusion: the MLF on the tuple of block outputs;
    * decoder: back to full resolution, up to the tail's input join (source "image":
      the model-space image);
    * tail: the global channel gate and the last 1x1 conv.
    """
    return {
        "encoder": (self.conv1, self.norm1, RELU, self.conv2, self.norm2, RELU, self.conv3),
        "pre_processing": (self.norm3, RELU, *self.pre_processing),
        "fusion": (Join(self._mlf, (self.gate,)),),
        "decoder": (self.deconv3, self.norm4, RELU, self.deconv2, self.norm5, RELU,
                    self.deconv1, Join(self._add_input, (self.conv_su1, self.conv_su2),
                                       ("image",))),
        "tail": (Join(self._gated, (self.layer1,)), self.deconv),
    }

  def _mlf(self, states: tuple[jax.Array, ...]) -> jax.Array:
    """Per-pixel weights from a conv over all block outputs (no softmax, as released)."""
    weights = self.gate(jnp.concatenate(states, axis=-1))
    return sum(s * weights[..., i:i + 1] for i, s in enumerate(states))

  def _add_input(self, x: jax.Array, model_image: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(self.conv_su1(x) + self.conv_su2(model_image),
                             negative_slope=self.config.leaky_slope)

  def _gated(self, x: jax.Array) -> jax.Array:
    return x + x * self.layer1(x)

  def encode(self, model_image: jax.Array) -> jax.Array:
    """Encoder: model-space image (even H, W) -> half-resolution features."""
    stages = self.stages()
    return run_steps(stages["pre_processing"], run_steps(stages["encoder"], model_image))

  def solve_blocks(self, model_image: jax.Array) -> list[BlockRun]:
    """`encode`, then every IM-block in turn: each block's input and its solve.

    Takes a model-space image with even H and W. The first block's ``g0`` is the
    encoder output; every later one is the previous block's ``output``.
    """
    g0 = self.encode(model_image)
    runs = []
    for block in self.im_blocks:
      runs.append(block.run(g0))
      g0 = runs[-1].output
    return runs

  def fuse(self, states: list[jax.Array]) -> jax.Array:
    """MLF: per-pixel weights from a conv over all block outputs (no softmax, as released)."""
    return run_steps(self.stages()["fusion"], tuple(states))

  def decode(self, fused: jax.Array, model_image: jax.Array) -> jax.Array:
    """Decoder and tail: fused features + the model-space input -> model-space output."""
    stages = self.stages()
    x = run_steps(stages["decoder"], fused, image=model_image)
    return run_steps(stages["tail"], x)

  def forward_runs(self, rgb: jax.Array) -> tuple[jax.Array, jax.Array, list[BlockRun]]:
    """RGB [0, 1] NHWC -> (output as ``__call__`` gives it, the model-space input, the runs).

    The runs (`solve_blocks`) let a training loss reuse the solve: penalties at the
    solutions, and `output_from_states` for other block outputs.
    """
    model_image = self.model_input(rgb)
    runs = self.solve_blocks(model_image)
    y = self.output_from_states([run.output for run in runs], model_image, rgb.shape[1:3])
    return y, model_image, runs

  def output_from_states(self, states: list[jax.Array], model_image: jax.Array,
                         size: tuple[int, int]) -> jax.Array:
    """MLF, decoder and tail on given block outputs: RGB [0, 1]-scale NHWC of ``size``."""
    out = self.decode(self.fuse(states), model_image)
    y = from_model_space(out.astype(jnp.float32), self.config)
    return y[:, :size[0], :size[1], :]

  def forward_rgb_with_diagnostics(self, rgb: jax.Array
                                   ) -> tuple[jax.Array, list[fp.FixedPointResult]]:
    """Like ``__call__`` (RGB [0, 1] in and out), plus each IM-block's `FixedPointResult`.

    The diagnostics (status, steps taken, final residual, residual history padded
    with NaN to the block's `iterations`; a two-stage block's are both stages'
    together, `combined`) have a leading batch axis; under ``jax.jit`` they come back
    without recompiling per image of the same size. A result's ``value`` is the
    block's solution: its output for implicit Euler and for a two-stage block, its
    stage for a one-stage block (`IMBlock.output` gives the answer, the next block's g0).
    """
    y, _, runs = self.forward_runs(rgb)
    return y, [run.result for run in runs]

  def __call__(self, rgb: jax.Array) -> jax.Array:
    """RGB [0, 1] NHWC (any H, W) -> RGB [0, 1]-scale NHWC, unclipped."""
    return self.forward_rgb_with_diagnostics(rgb)[0]


def to_model_input(rgb: jax.Array, cfg: ModelConfig) -> jax.Array:
  """`MINet.model_input` without a model: pad odd sides, then `to_model_space` in `cfg.dtype`."""
  h, w = rgb.shape[1:3]
  pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
  x = jnp.pad(rgb.astype(jnp.float32), pad, mode=cfg.pad_mode) if (h % 2 or w % 2) else rgb
  return to_model_space(x, cfg).astype(cfg.dtype)


def to_model_space(rgb: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RGB [0, 1] -> what the first layer expects (`cfg.input_format`)."""
  if cfg.input_format == "bgr255":
    return rgb[..., ::-1].astype(jnp.float32) * _BGR255_SCALE
  return rgb.astype(jnp.float32)


def from_model_space(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Inverse of `to_model_space`."""
  if cfg.input_format == "bgr255":
    return x[..., ::-1] / _BGR255_SCALE
  return x
