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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minet_jax import contractive
from minet_jax.metrics import psnr
from minet_jax.model import MINet
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


def loss_and_grads(model: MINet, batch: Batch, *, loss: str, key: jax.Array
                   ) -> tuple[tuple[jax.Array, tuple[jax.Array, Metrics]], nnx.State]:
  """The training objective at `model` and its gradient with respect to the parameters.

  Returns ``((loss, (output, parts)), grads)``: the objective is `reconstruction_loss`
  plus, when ``model.config.contractive_weight`` > 0, the weighted contractivity penalty
  of `minet_jax.contractive` (its random draws come from `key`); ``parts`` then holds
  both terms. ``grads`` is an `nnx.State` of the parameters' gradients.
  """
  contractive_weight = model.config.contractive_weight

  def loss_fn(model):
    output = model(batch["hazy"])
    reconstruction = reconstruction_loss(output, batch["clear"], loss)
    if not contractive_weight:
      return reconstruction, (output, {})
    penalty = contractive.weighted_penalty(model, batch, key=key)
    return reconstruction + penalty, (output, {"reconstruction_loss": reconstruction,
                                               "contractive_penalty": penalty})

  return nnx.value_and_grad(loss_fn, has_aux=True)(model)


def train_step(state: TrainState, batch: Batch, *, loss: str = "mse",
               learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
               ) -> tuple[TrainState, Metrics]:
  """One optimizer update on `batch`; returns the new state and scalar metrics.

  The loss is `reconstruction_loss` plus, when ``config.model.contractive_weight`` > 0,
  the weighted contractivity penalty of `minet_jax.contractive` (its random operating
  points and start vectors come from the run's key folded with the step).

  Metrics: ``loss``, ``psnr`` (of this batch's outputs, before the update),
  ``grad_norm``, ``reconstruction_loss`` and ``contractive_penalty`` when the penalty is
  on, and, given the schedule, ``learning_rate`` (the rate this update used).
  """
  model, optimizer = nnx.merge(state.graphdef, state.state)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  (value, (output, parts)), grads = loss_and_grads(model, batch, loss=loss, key=key)
  optimizer.update(model, grads)
  _, new_state = nnx.split((model, optimizer))
  metrics = {
      "loss": value,
      **parts,
      # A monitor on the [0, 1] scale: the batch's mean PSNR of its clipped outputs, each
      # capped at 100 dB so one exactly matched sample (a saturated crop) cannot make the
      # logged mean infinite.
      "psnr": jnp.mean(jnp.minimum(
          psnr(jnp.clip(output, 0.0, 1.0), batch["clear"], data_range=1.0), 100.0)),
      "grad_norm": optax.tree.norm(grads),
  }
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return state.replace(step=state.step + 1, state=new_state), metrics


def make_train_step(loss: str, learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    state_sharding: Any = None, batch_sharding: Any = None, *,
                    ynn_fusions: str = "default",
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step` jitted for one loss (and schedule), with optional shardings.

  `ynn_fusions` (``config.xla_cpu_ynn_fusions``) picks what XLA:CPU hands to YNNPACK
  in this one program (`cpu_compiler_options`); other programs keep XLA's defaults.
  The state's buffers are donated: the old state must not be used after a call.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
  options = cpu_compiler_options(ynn_fusions)

  def step(state, batch):
    return train_step(state, batch, loss=loss, learning_rate_fn=learning_rate_fn)

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
