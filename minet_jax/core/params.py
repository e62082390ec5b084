"""MI-Net parameters as data: `Params`, `init`, and the model <-> params maps.

`Params` carries the weights and the architecture they belong to, so a function of
`Params` needs nothing else and ``jax.jit`` can take it: the config is static pytree
metadata, the weights are the leaves. Weights are a nested dict with string keys
(orbax and JSON need them; NNX indexes list entries with ints, which
`model_from_params` restores).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, struct, traverse_util

from minet_jax.core.config import (ARCHITECTURE_FIELDS, INIT_FROM_FREE_FIELDS, ConfigLike,
                                   ModelConfig, model_config)
from minet_jax.core.model import MINet


@struct.dataclass
class Params:
  """MI-Net weights (nested dict of arrays, string keys) and their `ModelConfig`.

  The weights must have exactly the names and shapes of the config's architecture
  (ValueError naming the differing tensors otherwise): weights of one width under
  the config of another would run, wrongly or not at all, far from the cause.
  """
  weights: dict
  config: ModelConfig = struct.field(pytree_node=False)

  def __post_init__(self) -> None:
    # JAX rebuilds Params from its leaves in transformations; placeholders without a
    # shape (None, sentinels) are not weights to check.
    if not isinstance(self.config, ModelConfig) or not isinstance(self.weights, Mapping):
      return
    if not all(hasattr(leaf, "shape") for leaf in flat_weights(self.weights).values()):
      return
    problem = shape_mismatch(self.weights, self.config)
    if problem:
      raise ValueError(f"these weights do not fit the config's architecture: {problem}")

  def num_params(self) -> int:
    """The number of weights (628,078 for the released model)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.weights))

  def replace_config(self, **changes: Any) -> Params:
    """The same weights under a config with `changes`, e.g. how to run them:
    ``precision="default"`` or ``dtype="bfloat16"`` (docs/PRETRAINED.md: faster on CPUs
    with AVX512-BF16 or AMX, not exact), ``conv_backend="xla"``.

    The new config is validated like any `ModelConfig`. What the weights are stays:
    a change of an architecture field raises ValueError (``features`` would not fit the
    weights; ``eta`` or ``input_format`` would fit and compute something else), except
    the INIT_FROM_FREE_FIELDS (``stage_fraction``, ``stages``: the roles a fine-tune may
    give the same weights). ``Params(weights, config)`` pairs weights with any config
    they fit.
    """
    config = dataclasses.replace(self.config, **changes)
    fixed = [k for k in changes if k in ARCHITECTURE_FIELDS and k not in INIT_FROM_FREE_FIELDS
             and getattr(config, k) != getattr(self.config, k)]
    if fixed:
      raise ValueError(f"replace_config changes how the weights run, not what they are: "
                       f"{', '.join(fixed)} belong to the weights' architecture "
                       "(ModelConfig.architecture()); build Params(weights, config) to "
                       "pair them with another")
    return Params(weights=self.weights, config=config)


def stringify_keys(tree: Any) -> Any:
  """Nested dict with every key a string (orbax and JSON need them; nnx lists use ints)."""
  if isinstance(tree, Mapping):
    return {str(k): stringify_keys(v) for k, v in tree.items()}
  return tree


def restore_key_types(tree: Any, like: Any, path: tuple[str, ...] = ()) -> Any:
  """Restores the key types of `like` (nnx uses ints for list indices).

  Raises:
    ValueError: `tree` lacks an entry of `like`, naming it.
  """
  if isinstance(like, Mapping):
    missing = [str(k) for k in like if not isinstance(tree, Mapping) or str(k) not in tree]
    if missing:
      raise ValueError(f"the weights have no {'/'.join((*path, missing[0]))}"
                       + (f" (and {len(missing) - 1} more entries beside it)"
                          if len(missing) > 1 else "")
                       + " that the architecture needs")
    return {k: restore_key_types(tree[str(k)], v, (*path, str(k))) for k, v in like.items()}
  return tree


def flat_weights(weights: Mapping) -> dict[tuple[str, ...], Any]:
  """{path: leaf} of a weights tree, keys as strings, sorted by path."""
  flat = traverse_util.flatten_dict(stringify_keys(weights))
  return dict(sorted(flat.items()))


@functools.lru_cache(maxsize=16)
def _skeleton(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, dict]:
  """Graph definition, abstract state and its pure-dict shape, built without FLOPs."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MINet(cfg, rngs=nnx.Rngs(0))))
  return graphdef, state, nnx.to_pure_dict(state)


def abstract_weights(cfg: ModelConfig) -> dict:
  """The weights tree of architecture `cfg` as `jax.ShapeDtypeStruct` leaves (string keys)."""
  pure = _skeleton(cfg)[2]
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), stringify_keys(pure))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
  return tuple(weight_shapes(abstract_weights(cfg)).items())


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of every parameter of the architecture `cfg`."""
  return dict(_param_shapes(cfg))


def weight_shapes(weights: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of a weights tree (compare with `param_shapes`)."""
  return {path: tuple(leaf.shape) for path, leaf in flat_weights(weights).items()}


def shape_mismatch(weights: Mapping, cfg: ModelConfig) -> str | None:
  """Names the weights missing, extra or of another shape than architecture `cfg`
  says, on one line (None when they fit)."""
  return shapes_mismatch(weight_shapes(weights), cfg)


def shapes_mismatch(got: Mapping[tuple[str, ...], tuple[int, ...]],
                    cfg: ModelConfig) -> str | None:
  """`shape_mismatch` of flat {path: shape} (`weight_shapes`, or read from a file)."""
  return shape_differences(got, param_shapes(cfg))


def shape_differences(got: Mapping[tuple[str, ...], tuple[int, ...]],
                      expected: Mapping[tuple[str, ...], tuple[int, ...]]) -> str | None:
  """Names the paths of flat {path: shape} ``got`` missing, extra or of another shape
  than in ``expected``, on one line (None when they agree)."""
  if got == expected:
    return None
  wrong = sorted(set(expected) ^ set(got)) or sorted(
      k for k in expected if expected[k] != got[k])

  def describe(k):
    return f"{'.'.join(k)} {got[k] if k in got else 'missing'} (expected " \
           f"{expected[k] if k in expected else 'none'})"
  listed = "; ".join(describe(k) for k in wrong[:4])
  return listed + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")


def params_from_model(model: MINet) -> Params:
  """Snapshot of an NNX model's parameters as `Params`."""
  weights = stringify_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return Params(weights=weights, config=model.config)


def model_from_params(params: Params) -> MINet:
  """An NNX model holding `params` (no copy of the arrays)."""
  graphdef, abstract, pure = _skeleton(params.config)
  state = jax.tree.map(lambda leaf: leaf, abstract)  # A fresh State; the cached one stays abstract.
  nnx.replace_by_pure_dict(state, restore_key_types(params.weights, pure))
  return nnx.merge(graphdef, state)


def init(config: ConfigLike = None, *, seed: int = 0) -> Params:
  """Freshly initialised MI-Net parameters (the authors' initialisation).

  Args:
    config: None for the released architecture, a `ModelConfig`, or a (Config)dict
      (a full training config with a ``model`` section, or that section).
    seed: PRNG seed.
  """
  cfg = model_config(config)
  # The non-partitionable threefry compiles faster on XLA:CPU, and compiling dominates
  # the cost of drawing ~100 small parameter tensors eagerly (benchmarks/init_speed.py;
  # docs/PERFORMANCE.md).
  with jax.threefry_partitionable(False):
    return params_from_model(MINet(cfg, rngs=nnx.Rngs(seed)))


def weights_checksum(weights: Mapping) -> str:
  """SHA-256 of every weight's name, shape and float32 little-endian bytes."""
  digest = hashlib.sha256()
  named = sorted((".".join(path), leaf) for path, leaf in flat_weights(weights).items())
  for name, leaf in named:  # Ordered by dotted name: the order recorded checksums used.
    array = np.ascontiguousarray(np.asarray(leaf, dtype="<f4"))
    digest.update(f"{name}:{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def non_finite(weights: Mapping) -> str | None:
  """Names the first weight holding NaN or Inf values (None when all are finite)."""
  for path, leaf in flat_weights(weights).items():
    array = np.asarray(leaf)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
      return f"{'.'.join(path)} holds {bad} NaN or infinite value(s)"
  return None
