"""The table between minet-jax parameters and the authors' PyTorch state-dict names.

Every parameter has exactly one PyTorch name and one layout rule, so converting a
checkpoint is a lookup, not guesswork. IM-block i is named in the authors' code after
its dilation (``res1``, ``res2``, ``res4`` for dilations 1, 2, 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from minet_jax.core.config import ModelConfig

# Layout rules: how a PyTorch tensor becomes the minet-jax array.
CONV = "conv"                      # Conv2d weight OIHW -> HWIO
DECONV = "deconv"                  # ConvTranspose2d weight IOHW -> flipped forward kernel HWIO
VECTOR = "vector"                  # biases, norm scales: unchanged
SHARED_KERNEL = "shared_kernel"    # ShareSepConv weight (1, 1, k, k) -> (k, k)
LINEAR = "linear"                  # Linear(1, 1) weight (out, in) -> kernel (in, out)

Path = tuple[str, ...]


class StateDictMismatch(ValueError):
  """A state dict does not match the architecture; the message names every tensor."""


def _conv(prefix: Path, torch_prefix: str, bias: bool) -> dict[Path, tuple[str, str]]:
  table = {prefix + ("kernel",): (f"{torch_prefix}.weight", CONV)}
  if bias:
    table[prefix + ("bias",)] = (f"{torch_prefix}.bias", VECTOR)
  return table


def _norm(prefix: Path, torch_prefix: str) -> dict[Path, tuple[str, str]]:
  return {prefix + ("scale",): (f"{torch_prefix}.weight", VECTOR),
          prefix + ("bias",): (f"{torch_prefix}.bias", VECTOR)}


def torch_name_table(cfg: ModelConfig) -> dict[Path, tuple[str, str]]:
  """Maps each parameter path (as in `Params.weights`) to (PyTorch name, layout rule)."""
  table: dict[Path, tuple[str, str]] = {}
  for i in (1, 2, 3):
    table |= _conv((f"conv{i}",), f"conv{i}", bias=False)
    table |= _norm((f"norm{i}",), f"norm{i}")
  for b in range(cfg.pre_blocks):
    for j in (1, 2):
      table |= _conv(("pre_processing", str(b), f"conv{j}"), f"pre_processing.{b}.conv{j}", False)
      table |= _norm(("pre_processing", str(b), f"norm{j}"), f"pre_processing.{b}.norm{j}")
  for b, d in enumerate(cfg.dilations):
    prefix, name = ("im_blocks", str(b), "f"), f"res{d}"
    for j in (1, 2):
      if cfg.smoothed_dilation and d > 1:
        table[prefix + (f"pre_conv{j}", "kernel")] = (f"{name}.pre_conv{j}.weight", SHARED_KERNEL)
      table |= _conv(prefix + (f"conv{j}",), f"{name}.conv{j}", bias=False)
      table |= _norm(prefix + (f"norm{j}",), f"{name}.norm{j}")
  table |= _conv(("gate",), "gate", bias=True)
  table[("deconv3", "kernel")] = ("deconv3.weight", DECONV)
  table[("deconv3", "bias")] = ("deconv3.bias", VECTOR)
  table |= _norm(("norm4",), "norm4")
  table |= _conv(("deconv2",), "deconv2", bias=True)
  table |= _norm(("norm5",), "norm5")
  for name in ("deconv1", "conv_su1", "conv_su2", "deconv"):
    table |= _conv((name,), name, bias=True)
  # layer1 = Sequential(Conv2d, AdaptiveAvgPool2d, Linear, Linear, Sigmoid).
  table |= _conv(("layer1", "conv"), "layer1.0", bias=True)
  for fc, index in (("fc1", 2), ("fc2", 3)):
    table[("layer1", fc, "kernel")] = (f"layer1.{index}.weight", LINEAR)
    table[("layer1", fc, "bias")] = (f"layer1.{index}.bias", VECTOR)
  names = [name for name, _ in table.values()]
  if len(set(names)) != len(names):
    raise ValueError(f"dilations {cfg.dilations} name two IM-blocks alike; the authors' naming "
                     "(res<d>) needs distinct dilations")
  return table


def to_jax_layout(array: np.ndarray, rule: str) -> np.ndarray:
  """Applies one layout rule to a PyTorch array."""
  if rule == CONV:
    return np.transpose(array, (2, 3, 1, 0))
  if rule == DECONV:
    # ConvTranspose2d weight (in, out, kh, kw) -> forward conv kernel (kh, kw, in, out), flipped.
    return np.transpose(array, (2, 3, 0, 1))[::-1, ::-1]
  if rule == SHARED_KERNEL:
    return array.reshape(array.shape[-2:])
  if rule == LINEAR:
    return array.T
  if rule == VECTOR:
    return array
  raise ValueError(f"unknown layout rule {rule!r}")


def to_torch_layout(array: np.ndarray, rule: str) -> np.ndarray:
  """Inverse of `to_jax_layout`."""
  if rule == CONV:
    return np.transpose(array, (3, 2, 0, 1))
  if rule == DECONV:
    return np.transpose(array[::-1, ::-1], (2, 3, 0, 1))
  if rule == SHARED_KERNEL:
    return array.reshape((1, 1) + array.shape)
  if rule == LINEAR:
    return array.T
  if rule == VECTOR:
    return array
  raise ValueError(f"unknown layout rule {rule!r}")


# What a released weight may be stored as; anything else (complex, integer) is refused, not cast.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _strip(name: str) -> str:
  return name[len("module."):] if name.startswith("module.") else name


def _torch_shape(shape: tuple[int, ...], rule: str) -> tuple[int, ...]:
  # A zero-stride view: the layout rule's shape without allocating the tensor.
  return tuple(to_torch_layout(np.broadcast_to(np.uint8(0), shape), rule).shape)


def check_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig,
                     expected_shapes: Mapping[Path, tuple[int, ...]] | None = None) -> None:
  """Raises `StateDictMismatch` naming every missing, unexpected, mis-shaped or non-float tensor.

  Reads only names, ``.shape`` and ``.dtype``, so it can vet a checkpoint's lazily
  read tensors (`minet_jax.convert.torch_pickle.LazyTensor`) before any of their data is read.
  """
  sd = {_strip(k): v for k, v in state_dict.items()}
  table = torch_name_table(cfg)
  wanted = {name for name, _ in table.values()}
  missing = sorted(wanted - set(sd))
  unexpected = sorted(set(sd) - wanted)
  mismatched, not_float = [], []
  for path, (name, rule) in table.items():
    if name not in sd:
      continue
    got = tuple(sd[name].shape)
    if expected_shapes is not None and got != _torch_shape(tuple(expected_shapes[path]), rule):
      mismatched.append(f"{name}: got {got}, expected "
                        f"{_torch_shape(tuple(expected_shapes[path]), rule)}")
    if np.dtype(sd[name].dtype).name not in FLOAT_DTYPES:
      not_float.append(f"{name}: {np.dtype(sd[name].dtype).name} (weights are "
                       f"{'/'.join(FLOAT_DTYPES)}; refusing to cast)")
  if missing or unexpected or mismatched or not_float:
    lines = ["state dict does not match the MI-Net architecture "
             f"(dilations {cfg.dilations}, smoothed_dilation {cfg.smoothed_dilation}):"]
    lines += [f"  missing: {n}" for n in missing]
    lines += [f"  unexpected: {n}" for n in unexpected]
    lines += [f"  shape mismatch: {m}" for m in mismatched]
    lines += [f"  not floating point: {m}" for m in not_float]
    raise StateDictMismatch("\n".join(lines))


def weights_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                  cfg: ModelConfig,
                                  expected_shapes: Mapping[Path, tuple[int, ...]] | None = None,
                                  ) -> dict:
  """Converts a PyTorch state dict (numpy arrays) into a nested `Params.weights` dict.

  Raises `StateDictMismatch` naming every missing, unexpected, mis-shaped and
  non-float tensor (see `check_state_dict`), and every tensor holding NaN or
  infinite values (or values beyond float32's range). A leading ``module.``
  (DataParallel) is stripped.
  """
  check_state_dict(state_dict, cfg, expected_shapes)
  sd = {_strip(k): v for k, v in state_dict.items()}
  flat, non_finite = {}, []
  for path, (name, rule) in torch_name_table(cfg).items():
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
      array = np.ascontiguousarray(to_jax_layout(np.asarray(sd[name]), rule).astype(np.float32))
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
      non_finite.append(f"  {name}: {bad} of {array.size} values")
    flat[path] = array
  if non_finite:
    raise StateDictMismatch("the checkpoint holds NaN or infinite weights (or values beyond "
                            "float32's range):\n" +
                            "\n".join(non_finite))
  return traverse_util.unflatten_dict(flat)


def torch_state_dict_from_weights(weights: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The inverse map: nested `Params.weights` -> PyTorch-named, PyTorch-layout arrays."""
  out = {}
  for path, (name, rule) in torch_name_table(cfg).items():
    node = weights
    for key in path:
      node = node[key]
    out[name] = np.ascontiguousarray(to_torch_layout(np.asarray(node), rule))
  return out
