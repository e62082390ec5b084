"""The training state: model, optimizer and step as one pytree.

`TrainState` is what the jitted step consumes and returns. The NNX objects
(`MINet` and its `nnx.Optimizer`) are split once into a static graph definition
and a `nnx.State` of arrays, so the step is a pure function of arrays and a
checkpoint is a pure dict of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from minet_jax.core.config import ModelConfig, model_config
from minet_jax.core.model import MINet
from minet_jax.core.params import (Params, model_from_params, params_from_model, restore_key_types,
                              shape_differences, stringify_keys, weight_shapes)


@struct.dataclass
class TrainState:
  """Everything the train step needs, as a pytree.

  Attributes:
    step: number of optimizer updates applied (int32 scalar).
    state: `nnx.State` of ``(model, optimizer)``: parameters and Adam moments.
    rng: PRNG key of the run; the step folds in its index for any randomness.
    graphdef: static graph of ``(model, optimizer)`` (holds the optax transform).
  """
  step: jax.Array
  state: nnx.State
  rng: jax.Array
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)

  def merge(self) -> tuple[MINet, nnx.Optimizer]:
    """The live NNX model and optimizer (share no arrays with other states)."""
    return nnx.merge(self.graphdef, self.state)

  @property
  def model_config(self) -> ModelConfig:
    return self.merge()[0].config

  def params(self) -> Params:
    """The model's weights as `minet_jax.Params` (what `minet_jax.save` writes)."""
    model, _ = self.merge()
    return params_from_model(model)


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate as a function of the step, from ``config.optimizer``.

  ``schedule`` is "constant", "step" (times ``decay_factor`` every ``decay_steps``,
  the paper's recipe) or "cosine" (to ``learning_rate * cosine_final_fraction``
  at ``decay_steps``); ``warmup_steps`` > 0 prepends a linear warm-up from 0 (the
  first update's rate), and ``decay_steps`` then count from its end: the main schedule
  starts when the warm-up has reached ``learning_rate``.
  """
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif opt.schedule == "step":
    if opt.decay_steps <= 0:
      raise ValueError("optimizer.schedule='step' needs optimizer.decay_steps > 0")
    main = optax.exponential_decay(lr, transition_steps=int(opt.decay_steps),
                                   decay_rate=float(opt.decay_factor), staircase=True)
  elif opt.schedule == "cosine":
    if opt.decay_steps <= 0:
      raise ValueError("optimizer.schedule='cosine' needs optimizer.decay_steps > 0")
    main = optax.cosine_decay_schedule(lr, int(opt.decay_steps),
                                       alpha=float(opt.cosine_final_fraction))
  else:
    raise ValueError(f"optimizer.schedule must be 'constant', 'step' or 'cosine', "
                     f"got {opt.schedule!r}")
  if opt.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, int(opt.warmup_steps))
  return optax.join_schedules([warmup, main], [int(opt.warmup_steps)])


def check_optimizer(opt: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the ``config.optimizer`` field that Adam cannot use."""
  if opt.name != "adam":
    raise ValueError(f"optimizer.name must be 'adam' (the paper's optimizer), got {opt.name!r}")
  # Step counts reach the schedule as int32.
  step_count = (lambda v: v.is_integer() and 0 <= v < 2**31, "an integer in [0, 2**31)")
  ranges = {  # field: (test, what it must be); NaN fails every test.
      "learning_rate": (lambda v: 0 < v < math.inf, "a finite number > 0"),
      "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
      # 0 would divide 0 by 0 for any weight whose gradient is exactly 0 (NaN).
      "eps": (lambda v: 0 < v < math.inf, "a finite number > 0"),
      "grad_clip_norm": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: off)"),
      "decay_factor": (lambda v: 0 < v < math.inf, "a finite number > 0"),
      "cosine_final_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
      "warmup_steps": step_count,
      "decay_steps": step_count,
  }
  for name, (test, must) in ranges.items():
    value = opt[name]
    try:
      ok = not isinstance(value, bool) and test(float(value))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"optimizer.{name} must be {must}, got {value!r}")
  learning_rate_schedule(opt)  # The schedule's own checks.


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the configured schedule, after optional global-norm clipping."""
  check_optimizer(opt)
  adam = optax.adam(learning_rate_schedule(opt), b1=float(opt.b1), b2=float(opt.b2),
                    eps=float(opt.eps))
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(opt.grad_clip_norm)), adam)
  return adam


def shrink_blocks(params: Params, factors: tuple[float, ...]) -> Params:
  """The same model with each IM-block's f scaled by ``factors[i]`` (one per block).

  f ends in relu(IN(.) * scale + bias), and relu is positively homogeneous, so scaling
  that last instance norm's scale and bias by s > 0 gives exactly s * f: the Picard
  map's Jacobian eta * df/dg shrinks by s as well. A start for stable training
  (configs/stable.py): the released blocks are no contractions, the shrunk ones are.
  """
  factors = tuple(float(s) for s in factors)
  if len(factors) != params.config.num_blocks or not all(s > 0 for s in factors):
    raise ValueError(f"need one positive factor per IM-block ({params.config.num_blocks}), "
                     f"got {factors}")
  weights = jax.tree.map(lambda x: x, params.weights)  # A new tree sharing the leaves.
  for i, s in enumerate(factors):
    norm = dict(weights["im_blocks"][str(i)]["f"]["norm2"])
    weights["im_blocks"][str(i)]["f"]["norm2"] = {k: v * s for k, v in norm.items()}
  return Params(weights=weights, config=params.config)


def replace_blocks(params: Params, sources: Mapping[int, Params]) -> Params:
  """The same model with IM-block i's weights (0-based) taken from ``sources[i]``.

  Each source must hold that block with the same parameter names and shapes (its other
  layers and its config are not read): a block trained in another run, or the released
  block as the start of a block trained again (configs/stable_fullres.py).
  """
  weights = dict(params.weights)
  blocks = dict(weights["im_blocks"])
  for i, source in sources.items():
    if not 0 <= i < params.config.num_blocks:
      raise ValueError(f"IM-block index {i} is outside the model's {params.config.num_blocks}")
    theirs = source.weights.get("im_blocks", {}).get(str(i))
    if theirs is None:
      raise ValueError(f"the source has no IM-block {i + 1}")
    problem = shape_differences(weight_shapes(theirs), weight_shapes(blocks[str(i)]))
    if problem:
      raise ValueError(f"IM-block {i + 1} of the source differs at {problem}")
    blocks[str(i)] = theirs
  weights["im_blocks"] = blocks
  return Params(weights=weights, config=params.config)


INIT_TAILS = ("kaiming", "identity")
# The tail's RGB -> RGB 1x1 convolutions (minet_jax.core.model.MINet.decode).
_RGB_CONVS = ("conv_su1", "conv_su2", "deconv")


def init_tail(model: MINet, kind: str) -> None:
  """Re-initialises the tail's RGB -> RGB 1x1 convs in place.

  "kaiming" keeps the authors' random init. "identity" makes ``conv_su1``,
  ``conv_su2`` and ``deconv`` identity maps with zero bias, so the untrained
  network passes the hazy colours through (times the channel gate) instead of
  mixing them randomly; short runs then no longer spend their steps undoing a
  random colour cast.
  """
  if kind not in INIT_TAILS:
    raise ValueError(f"config.init_tail must be one of {INIT_TAILS}, got {kind!r}")
  if kind == "kaiming":
    return
  for name in _RGB_CONVS:
    conv = getattr(model, name)
    conv.kernel[...] = jnp.eye(3, dtype=conv.kernel.dtype).reshape(conv.kernel.shape)
    if conv.bias is not None:
      conv.bias[...] = jnp.zeros_like(conv.bias[...])


def create_train_state(config: ml_collections.ConfigDict, params: Params | None = None,
                       cfg: ModelConfig | None = None) -> TrainState:
  """A fresh state: initialised (or given) weights, zeroed optimizer, step 0.

  Args:
    config: the training config (``model``, ``optimizer``, ``seed`` and ``init_tail``
      are read).
    params: start from these weights instead of a random init (fine-tuning); their
      architecture must equal ``config.model``.
    cfg: ``config.model`` parsed (`model_config`), when the caller has it already.
  """
  cfg = model_config(config.model) if cfg is None else cfg
  init_key, run_key = jax.random.split(jax.random.key(int(config.seed)))
  if params is None:
    # XLA:CPU compiles the partitionable threefry PRNG (JAX's default) more slowly for
    # each of the ~100 weight shapes (benchmarks/init_speed.py measures it; the figures
    # are in docs/PERFORMANCE.md). The classic threefry draws from the same
    # distributions, only different values.
    with jax.threefry_partitionable(False):
      model = MINet(cfg, rngs=nnx.Rngs(params=init_key))
    init_tail(model, config.init_tail)
  elif params.config.architecture() != cfg.architecture():
    raise ValueError("the weights to start from have a different architecture than "
                     f"config.model:\n  weights: {params.config}\n  config:  {cfg}\n"
                     "set config.model to the checkpoint's architecture")
  else:
    # A copy (training updates it), run as config.model says (e.g. its conv_backend).
    model = model_from_params(Params(weights=jax.tree.map(jnp.array, params.weights),
                                     config=cfg))
  optimizer = nnx.Optimizer(model, make_optimizer(config.optimizer), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return TrainState(step=jnp.zeros((), jnp.int32), state=state,
                    rng=jax.random.key_data(run_key), graphdef=graphdef)


def abstract_train_state(config: ml_collections.ConfigDict,
                         cfg: ModelConfig | None = None) -> TrainState:
  """The shapes and dtypes of `create_train_state(config, cfg=cfg)`, built without FLOPs."""
  return nnx.eval_shape(lambda: create_train_state(config, cfg=cfg))  # type: ignore[return-value]


def state_to_pure(state: TrainState) -> dict[str, Any]:
  """Checkpointable pure dict (string keys, arrays) of everything but the graph."""
  return {"step": state.step, "rng": state.rng,
          "state": stringify_keys(nnx.to_pure_dict(state.state))}


def state_from_pure(like: TrainState, pure: dict[str, Any]) -> TrainState:
  """Inverse of `state_to_pure`, with `like` (e.g. an abstract state) giving the graph."""
  template = nnx.to_pure_dict(like.state)
  restored = jax.tree.map(lambda x: x, like.state)  # A fresh State to fill in.
  nnx.replace_by_pure_dict(restored, restore_key_types(pure["state"], template))
  return TrainState(step=jnp.asarray(pure["step"], jnp.int32), state=restored,
                    rng=jnp.asarray(pure["rng"], jnp.uint32), graphdef=like.graphdef)
