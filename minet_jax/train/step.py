"""The pure training step and the losses.

``train_step(state, batch) -> (state, metrics)`` is a pure function of arrays:
`make_train_step` closes it over the (static) loss choice and jits it, with the
batch sharded over the mesh's data axis and the state replicated when a mesh is
given (`minet_jax.train.sharding`). The batch holds ``hazy`` and ``clear``, NHWC
float32 RGB in [0, 1]; the model's output is compared with ``clear`` unclipped.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minet_jax.stability import contractive
from minet_jax.metrics import psnr
from minet_jax.core.config import block_indices
from minet_jax.core.model import MINet
from minet_jax.core.params import Params, model_from_params
from minet_jax.train.state import TrainState

LOSSES = ("mse", "l2", "l1")
# The authors' loss is taken on 0..255 pixel values.
_PIXEL_SCALE = 255.0

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def reconstruction_loss(output: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """Loss between a batch of outputs and targets (RGB, [0, 1] scale).

  kind:
    "mse": mean squared error over all pixels and channels.
    "l2": the authors' training loss exactly (``torch.norm(output - gt)`` in
      Jiawei-Shen/MI-Net ``main.py``): the unsquared Frobenius norm of the whole batch's
      error on their 0..255 pixel scale, i.e. 255 times the norm on [0, 1]. The scale
      matters only through Adam's epsilon, which it keeps identical to theirs.
    "l1": mean absolute error.
  """
  err = output.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(jnp.square(err))
  if kind == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(err * _PIXEL_SCALE)))
  if kind == "l1":
    return jnp.mean(jnp.abs(err))
  raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


# Whose block inputs the teacher matching uses (config.teacher_inputs, `train_step`).
TEACHER_INPUTS = ("teacher", "student")


def loss_and_grads(model: MINet, batch: Batch, *, loss: str, key: jax.Array,
                   teacher_blocks: list[tuple[jax.Array, jax.Array]] | None = None,
                   match_weight: float = 0.0, output_weight: float = 1.0,
                   match_steps: int = 1, train_blocks: Sequence[int] | None = None,
                   teacher_inputs: str = "teacher",
                   ) -> tuple[tuple[jax.Array, tuple[jax.Array | None, Metrics]], nnx.State]:
  """The training objective at `model` and its gradient with respect to the parameters.

  Returns ``((loss, (output, parts)), grads)``. The objective is ``output_weight``
  times `reconstruction_loss` of the model's output (skipped, with ``output`` None,
  when 0) plus, as asked:

  * ``match_weight`` > 0: the fixed-point mismatch of every block at the teacher's
    block input and output ``teacher_blocks`` (`contractive.fixed_point_mismatch`,
    after ``match_steps`` Picard steps warm-started at the teacher's stage): trains each
    f so that the teacher's block output is its fixed point; with ``teacher_inputs``
    "student", each block's input is the model's own instead (its solved blocks, no
    gradient through them; from the output term's forward pass when there is one);
  * ``config.contractive_weight`` > 0: the weighted penalty of `minet_jax.stability.contractive`
    (``contractive_kind``) on every block's Jacobian, at a random Picard iterate or at
    the block's solution (``contractive_point``: the forward pass's own, or, when the
    output term is skipped, the stages that answer the teacher's block output from
    the matched block input, the teacher's or with "student" the model's own:
    `IMBlock.stage_points`, every stage of a two-stage block);
  * ``config.correction_weight`` > 0: the fixed-point correction loss, `reconstruction_loss`
    of the output decoded from T(g_k) for every block, g_k a random Picard iterate
    of the block (no gradient through g_k): it asks early iterates to be good too.

  ``train_blocks`` (0-based IM-block indices; None: all) limits the matching term and
  the contractive penalty to those blocks, and zeroes every other parameter's gradient
  (`frozen_mask`); the output and correction losses still run the whole model.

  Random draws come from `key`; ``parts`` holds every term when there is more than
  one. ``grads`` is an `nnx.State` of the parameters' gradients.
  """
  cfg = model.config
  penalty_key, correction_key = key, jax.random.fold_in(key, 1)
  if match_weight and teacher_blocks is None:
    raise ValueError("match_weight > 0 needs the teacher's block states (teacher_blocks)")
  if teacher_inputs not in TEACHER_INPUTS:
    raise ValueError(f"unknown teacher_inputs {teacher_inputs!r}; choose one of {TEACHER_INPUTS}")
  student_inputs = teacher_inputs == "student" and teacher_blocks is not None
  if student_inputs and not output_weight:
    # No forward pass in the loss to take them from: solve the blocks once here.
    own = model.solve_blocks(model.model_input(batch["hazy"]))
    teacher_blocks = jax.lax.stop_gradient([(run.g0, y) for run, (_, y) in
                                            zip(own, teacher_blocks)])
    student_inputs = False
  if not output_weight and (cfg.correction_weight or (
      cfg.contractive_weight and cfg.contractive_point == "solution" and teacher_blocks is None)):
    raise ValueError("the correction loss, and a penalty at the solutions without a teacher, "
                     "need the model's forward pass (output_weight > 0)")

  chosen = block_indices(train_blocks, cfg.num_blocks, "train_blocks")

  def loss_fn(model):
    parts, total = {}, jnp.float32(0.0)
    output = runs = None
    matched = teacher_blocks
    if output_weight:
      output, model_image, runs = model.forward_runs(batch["hazy"])
      parts["reconstruction_loss"] = reconstruction_loss(output, batch["clear"], loss)
      total = total + output_weight * parts["reconstruction_loss"]
      if student_inputs:
        matched = [(jax.lax.stop_gradient(run.g0), y) for run, (_, y) in zip(runs, matched)]
    # Each matched block's stages in the step that answers the matched output: a
    # two-stage block's first stage is solved once, for the matching and the penalty.
    at_matched = match_weight or (cfg.contractive_weight and runs is None
                                  and cfg.contractive_point == "solution")
    staged = ({i: model.im_blocks[i].stage_points(g0, y) for i, (g0, y) in enumerate(matched)
               if i in chosen} if at_matched else {})
    if match_weight:
      mismatch = sum(jnp.mean(contractive.fixed_point_mismatch(
          model.im_blocks[i], g0, g, match_steps, stage_points=staged[i]))
                     for i, (g0, g) in enumerate(matched) if i in chosen)
      parts["fixed_point_mismatch"] = match_weight * mismatch
      total = total + parts["fixed_point_mismatch"]
    if cfg.contractive_weight:
      if cfg.contractive_point == "solution":
        # Every stage's solution; the blocks not chosen are not looked at.
        points = ([run.points for run in runs] if runs is not None
                  else [staged.get(i, [(g0, y)]) for i, (g0, y) in enumerate(matched)])
        penalty = contractive.penalty_at_points(model, jax.lax.stop_gradient(points),
                                                key=penalty_key, blocks=chosen)
      else:
        penalty = contractive.penalty(model, batch, key=penalty_key, blocks=chosen)
      parts["contractive_penalty"] = cfg.contractive_weight * penalty
      total = total + parts["contractive_penalty"]
    if cfg.correction_weight:
      keys = jax.random.split(correction_key, len(runs))
      states = []
      for block, run, k in zip(model.im_blocks, runs, keys):
        g0 = jax.lax.stop_gradient(run.g0)
        t_map, f_state = block.map_fn()
        stage = t_map(contractive.random_iterate(block, g0, k), (g0, f_state))
        states.append(block.output(g0, stage))
      early = model.output_from_states(states, model_image, batch["hazy"].shape[1:3])
      parts["correction_loss"] = cfg.correction_weight * reconstruction_loss(
          early, batch["clear"], loss)
      total = total + parts["correction_loss"]
    if len(parts) == 1 and "reconstruction_loss" in parts and output_weight == 1.0:
      parts = {}  # One term: it is the loss.
    return total, (output, parts)

  (value, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  if train_blocks is not None:
    frozen = frozen_mask(grads, chosen)
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  return (value, aux), grads


def frozen_mask(tree: Any, train_blocks: Sequence[int]) -> Any:
  """True for each leaf of a parameter tree (an `nnx.State` of a `MINet`, or
  `Params.weights`) outside the f of the IM-blocks ``train_blocks`` (0-based): what a
  run that trains only those blocks keeps fixed."""
  trained = {str(i) for i in train_blocks}  # nnx.State numbers the blocks, weights name them

  def frozen(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return not (len(keys) > 2 and keys[0] == "im_blocks" and str(keys[1]) in trained
                and keys[2] == "f")
  return jax.tree_util.tree_map_with_path(frozen, tree)


def train_step(state: TrainState, batch: Batch, *, loss: str = "mse",
               learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
               teacher: Params | None = None, match_weight: float = 0.0,
               output_weight: float = 1.0, match_steps: int = 1,
               train_blocks: Sequence[int] | None = None,
               teacher_inputs: str = "teacher") -> tuple[TrainState, Metrics]:
  """One optimizer update on `batch`; returns the new state and scalar metrics.

  The loss is `loss_and_grads`' (its random draws come from the run's key folded with
  the step). With a `teacher` (self-distillation), the target is the teacher's output
  on ``batch["hazy"]`` instead of ``batch["clear"]``, and its block inputs and
  outputs are what ``match_weight`` matches; ``psnr`` is then measured against the
  teacher too, and ``psnr_clear`` against the ground truth. With ``teacher_inputs``
  "student" the matched blocks (and, without an output term, the penalised ones) take
  the model's own block inputs instead, from its solved blocks (no gradient through
  them): each block learns to bring the states that the model's earlier blocks give it
  back to the teacher's block output.

  ``train_blocks`` (0-based; None: all) trains only those IM-blocks' f: the other
  parameters keep their values exactly, whatever the optimizer's state, and
  ``grad_norm`` (and a gradient clip) sees the trained parameters' gradients alone.

  Metrics: ``loss``, ``psnr`` (of this batch's outputs, before the update; absent when
  ``output_weight`` is 0), ``grad_norm``, the terms of the loss when there are several,
  and, given the schedule, ``learning_rate`` (the rate this update used).
  """
  model, optimizer = nnx.merge(state.graphdef, state.state)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  clear = batch["clear"]
  if teacher_inputs not in TEACHER_INPUTS:
    raise ValueError(f"unknown teacher_inputs {teacher_inputs!r}; choose one of {TEACHER_INPUTS}")
  teacher_blocks = None
  if teacher is not None:
    target, _, runs = model_from_params(teacher).forward_runs(batch["hazy"])
    batch = {**batch, "clear": jax.lax.stop_gradient(target)}
    teacher_blocks = jax.lax.stop_gradient([(run.g0, run.output) for run in runs])
  (value, (output, parts)), grads = loss_and_grads(
      model, batch, loss=loss, key=key, teacher_blocks=teacher_blocks,
      match_weight=match_weight, output_weight=output_weight, match_steps=match_steps,
      train_blocks=train_blocks, teacher_inputs=teacher_inputs)
  if train_blocks is not None:
    # nnx.state shares the model's variables: a copy of the tree keeps the old values.
    before = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  if train_blocks is not None:
    # A zero gradient leaves a parameter in place only while its Adam moments are zero,
    # not after a resume of a run that trained it: put the frozen ones back.
    nnx.update(model, jax.tree.map(lambda new, old, keep: old if keep else new,
                                   nnx.state(model, nnx.Param), before,
                                   frozen_mask(before, train_blocks)))
  _, new_state = nnx.split((model, optimizer))
  metrics = {"loss": value, **parts, "grad_norm": optax.tree.norm(grads)}
  if output is not None:
    metrics["psnr"] = _batch_psnr(output, batch["clear"])
    if teacher is not None:
      metrics["psnr_clear"] = _batch_psnr(output, clear)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return state.replace(step=state.step + 1, state=new_state), metrics


def _batch_psnr(output: jax.Array, target: jax.Array) -> jax.Array:
  """A monitor on the [0, 1] scale: the batch's mean PSNR of its clipped outputs, each
  capped at 100 dB so one exactly matched sample (a saturated crop) cannot make the
  logged mean infinite."""
  return jnp.mean(jnp.minimum(psnr(jnp.clip(output, 0.0, 1.0), target, data_range=1.0), 100.0))


def make_train_step(loss: str, learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    state_sharding: Any = None, batch_sharding: Any = None, *,
                    ynn_fusions: str = "default", teacher: Params | None = None,
                    match_weight: float = 0.0, output_weight: float = 1.0,
                    match_steps: int = 1, train_blocks: Sequence[int] | None = None,
                    teacher_inputs: str = "teacher",
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step` jitted for one loss (and schedule), with optional shardings.

  `ynn_fusions` (``config.xla_cpu_ynn_fusions``) picks what XLA:CPU hands to YNNPACK
  in this one program (`cpu_compiler_options`); other programs keep XLA's defaults.
  The state's buffers are donated: the old state must not be used after a call.
  A `teacher` makes its output the target and its block states what ``match_weight``
  matches (`train_step`); its weights are constants of the compiled step.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
  options = cpu_compiler_options(ynn_fusions)

  def step(state, batch):
    return train_step(state, batch, loss=loss, learning_rate_fn=learning_rate_fn,
                      teacher=teacher, match_weight=match_weight, output_weight=output_weight,
                      match_steps=match_steps, train_blocks=train_blocks,
                      teacher_inputs=teacher_inputs)

  if state_sharding is None:
    return jax.jit(step, donate_argnums=0, compiler_options=options)
  # Metrics come back replicated, so every host can read them.
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, state_sharding), donate_argnums=0,
                 compiler_options=options)


# config.xla_cpu_ynn_fusions' names for XLA:CPU's YNNPACK fusion kinds (the enum values
# of its ``xla_cpu_experimental_ynn_fusion_type`` option, jaxlib 0.10).
YNN_FUSION_KINDS = {
    "dot": "LIBRARY_FUSION_TYPE_DOT",
    "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
    "reduce": "LIBRARY_FUSION_TYPE_REDUCE",
    "convolution": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def parse_ynn_fusions(value: str) -> tuple[str, ...]:
  """``"default"`` -> (); ``"dot"``, ``"dot,eltwise"``, ... -> the kinds; else ValueError."""
  if value == "default":
    return ()
  kinds = tuple(part.strip() for part in value.split(","))
  if any(k not in YNN_FUSION_KINDS for k in kinds) or len(set(kinds)) < len(kinds):
    raise ValueError(f"must be 'default' or a comma-separated list of distinct names "
                     f"from {', '.join(YNN_FUSION_KINDS)}; got {value!r}")
  return kinds


def cpu_compiler_options(ynn_fusions: str) -> dict[str, str] | None:
  """Per-program XLA options restricting YNNPACK to `ynn_fusions`, or None for XLA's defaults.

  By default XLA:CPU (jaxlib 0.10) hands YNNPACK most matrix products and
  convolutions, and elementwise and reduction fusions. Keeping only matrix products
  there ("dot") runs the convolutions and their gradients in XLA's own kernels, which
  are faster at training batch sizes (benchmarks/train_step_speed.py, docs/TRAINING.md);
  only the program compiled with these options changes. None (XLA's defaults) off the
  CPU backend, and where jaxlib does not take the option (it is experimental): checked
  once by compiling a tiny program with it.
  """
  kinds = parse_ynn_fusions(ynn_fusions)
  if not kinds or jax.default_backend() != "cpu":
    return None
  options = {_YNN_OPTION: ",".join(YNN_FUSION_KINDS[k] for k in kinds)}
  return options if _compiles_with(tuple(options.items())) else None


@functools.cache
def _compiles_with(options: tuple[tuple[str, str], ...]) -> bool:
  try:
    jax.jit(jnp.negative, compiler_options=dict(options)).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception as e:  # jaxlib reports an unknown option as a runtime error.
    warnings.warn(f"XLA does not take {dict(options)} ({e}); the training step is compiled "
                  "with XLA's defaults", stacklevel=3)
    return False
  return True
