"""The model's configuration as one hashable record.

`ModelConfig` holds every hyperparameter of MI-Net in two parts: its `Architecture`
(what the weights are: compared, and refused on mismatch) and its `Solve` settings
(how the IM-blocks are solved and differentiated, the training penalties and the
numerics: free to change between a checkpoint and a run that uses it). Its defaults are
the authors' released model (Jiawei-Shen/MI-Net, ``MINet.py``), which is the model
the paper's 0.628M parameter count and results describe: T = 8 iterations per
IM-block, eta = 1, dilations 1/2/4 with smoothed dilated convolutions. The paper's
text (Shen et al., CVPRW 2020) describes T = 12 and dilations 1/2/5; that variant is
`paper_text_variant()`.

The record is frozen and hashable so it can ride along with the weights as static
pytree metadata: ``jax.jit(minet_jax.apply)`` then needs nothing but ``(params, img)``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import ml_collections
import numpy as np

# Names of the IM-block solvers and backward modes: the classes of the fixed-point
# engine define them (`fixed_point.from_config` builds the objects).
from minet_jax.core.fixed_point import (BACKWARDS, SOLVERS, canonical_unroll,  # noqa: E402
                                        is_integer, stops_at_tolerance)

CONTRACTIVE_KINDS = ("spectral", "radius", "radius_exact", "frobenius")
CONTRACTIVE_POINTS = ("iterate", "solution")
INPUT_FORMATS = ("bgr255", "rgb01")
DTYPES = ("float32", "bfloat16", "float16")
# The smallest rtol a solve of bfloat16 iterates meets: their relative residual settles
# near bfloat16's unit roundoff 2**-8 (1.5e-3 to 2.5e-3 measured on released blocks).
BF16_RTOL_FLOOR = 4e-3
PRECISIONS = ("highest", "default")
# Who runs the convolutions (`minet_jax.core.onednn`): "onednn" (on CPU through oneDNN's
# kernels: float32, and bfloat16 where the CPU has it natively; XLA's elsewhere),
# "xla" (XLA's own), "auto" (oneDNN's when the default backend is the CPU and the
# kernels build, else XLA's).
CONV_BACKENDS = ("auto", "xla", "onednn")
# Fields that say how a machine runs the model, not what the model is: checkpoints do
# not store them (a model trained with TF32 is loaded exact), and configs differing
# only there describe the same architecture.
RUNTIME_FIELDS = ("conv_backend", "precision")
# Architecture fields a fine-tune may change from the weights it starts from
# (``config.init_from``): every weight keeps its shape and its role (the f of an implicit
# Euler block becomes the f of a block that solves an earlier stage of its step), so the
# weights are a start, not a mismatch. Resuming and loading still compare them.
INIT_FROM_FREE_FIELDS = ("stage_fraction", "stages")
# The smallest stage fraction (`Architecture.stage_fraction`).
MIN_STAGE_FRACTION = 0.01
# The numbers of implicit stages a block may take (`Architecture.stages`).
STAGE_COUNTS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the weights are: every field that decides their shapes or what they compute.

  Checkpoints store these, runs compare them, and a mismatch is refused (`init_from`,
  resume, `Params`; `init_from` may change the INIT_FROM_FREE_FIELDS). Defaults are the
  authors' released model.
  """

  # Width of every feature map between the encoder and the decoder.
  features: int = 64
  # Number of residual blocks after the stride-2 encoder conv ("pre_processing").
  pre_blocks: int = 3
  # Dilation of the first 3x3 conv of each IM-block's f (one entry per block).
  dilations: tuple[int, ...] = (1, 2, 4)
  # Step size: each implicit Euler block iterates g <- g0 + eta * f(g).
  eta: float = 1.0
  # Where each IM-block's implicit stage sits in its step (one entry per block, or one
  # number for all; a one-stage implicit Runge-Kutta step, c = a11 = s, b = 1): block i
  # solves k = g0 + s_i * eta * f_i(k) and answers g0 + eta * f_i(k), which at the
  # stage's solution is g0 + (k - g0) / s_i. 1 is implicit Euler (the paper and the
  # released model: the answer is k), 1/2 the implicit midpoint rule. A smaller fraction
  # shrinks the solved map's Jacobian to stage_fraction * eta * df/dg, so a block whose
  # implicit Euler map expands can be solved as a contraction (docs/STABILITY.md).
  stage_fraction: Union[float, tuple[float, ...]] = 1.0
  # Implicit stages of each IM-block's step (one entry per block, or one number for all):
  # 1 is the one-stage step above; 2 a two-stage, stiffly accurate singly diagonally
  # implicit Runge-Kutta step with both stages at the block's fraction G (< 1): it solves
  # k1 = g0 + G eta f(k1), then y = c + G eta f(y) with c = g0 + (1 - G) eta f(k1), and
  # answers y. Both stage maps have the Jacobian G eta df/dg, and the second stage lets
  # the block compose two evaluations of f where a one-stage block has one
  # (docs/STABILITY.md, "A second stage for block 2").
  stages: Union[int, tuple[int, ...]] = 1
  # Put a shared (2d-1)x(2d-1) smoothing kernel before both convs of blocks with d > 1.
  smoothed_dilation: bool = True
  # What the network's first layer sees: "bgr255" (released weights) or "rgb01".
  input_format: str = "bgr255"
  # Epsilon of every instance norm (PyTorch's InstanceNorm2d default).
  norm_eps: float = 1e-5
  # Negative slope of the LeakyReLU in the tail.
  leaky_slope: float = 0.1
  # Negative slope `a` of the Kaiming-normal init of plain convs (authors: kaiming_normal_(w, 0.1)).
  init_kaiming_a: float = 0.1
  # Padding mode used to grow odd image sizes to even before the stride-2 encoder ("edge"/"reflect").
  pad_mode: str = "reflect"


@dataclasses.dataclass(frozen=True)
class Solve:
  """How the IM-blocks are solved and differentiated, trained and computed.

  None of these change the weights' shapes: they may differ between a checkpoint
  and a run that starts from it (`init_from`), resumes it, or loads it. Checkpoints
  store them (except the RUNTIME_FIELDS) as the settings the weights were trained
  with, which `load` uses unless told otherwise.
  """

  # Map evaluations of each IM-block (one entry per block, or one int for all): exactly
  # this many for the "unrolled" solver (T of the released model), the cap for the others.
  iterations: tuple[int, ...] = (8, 8, 8)
  # lax.scan unroll of the IM-block iteration: "auto" (full on CPU, 1 elsewhere), "full"
  # (True is read as "full", False as 1), or an int.
  unroll: Union[str, int, bool] = "auto"
  # How each IM-block solves g = g0 + eta * f(g), or its stage (stage_fraction)
  # (minet_jax.core.fixed_point, which documents the maths): "unrolled" runs exactly
  # `iterations` steps (the released model); "picard" and "anderson" run until the
  # relative residual meets rtol/atol, at most `iterations` steps.
  solver: str = "unrolled"
  # "picard"/"anderson" stop when rms(T(g) - g) <= atol + rtol * rms(T(g)), T(g) = g0 + eta f(g)
  # (a stage block: T(g) = g0 + s eta f(g); its answer's error is then up to 1/s that of
  # the stage); for "unrolled" the test only decides the reported status of each block's solve.
  rtol: float = 1e-3
  # Absolute tolerance of that test, per element (0: relative only).
  atol: float = 0.0
  # Anderson acceleration: number of past iterates mixed (m).
  anderson_m: int = 5
  # Anderson damping beta in (0, 1]: 1 mixes the map values only, smaller leans on the iterates.
  anderson_beta: float = 1.0
  # Tikhonov regulariser of Anderson's m x m least squares, relative to its mean diagonal.
  anderson_reg: float = 1e-5
  # "picard"/"anderson": when a solve misses the tolerance, answer with the iterate of
  # lowest residual instead of the last one.
  best_so_far: bool = False
  # IM-block gradients: "backprop" through the iterations, "implicit" (implicit function
  # theorem; memory flat in the number of iterations) or "phantom" (phantom_steps damped
  # steps at the solution; 1 step, damping 1 is Jacobian-free backprop).
  backward: str = "backprop"
  # Step cap of the implicit backward's adjoint solve (0: the block's `iterations`).
  adjoint_max_steps: int = 0
  # Relative and absolute tolerances of the adjoint solve (same test as rtol/atol).
  adjoint_rtol: float = 1e-3
  adjoint_atol: float = 0.0
  # "phantom" backward: k differentiated damped steps at the solution, and their damping.
  phantom_steps: int = 1
  phantom_damping: float = 1.0
  # Training only (minet_jax.stability.contractive): weight of the penalty on each block's
  # Jacobian J = eta * df/dg (0: off).
  contractive_weight: float = 0.0
  # Which penalty: "spectral" (max(0, ||J||_2 - contractive_target)^2 by power iteration),
  # "radius" (the same hinge on a power-iteration estimate of rho(J), Theorem 1's
  # condition, differentiated as ||J v|| with v held), "radius_exact" (the same hinge on
  # a two-sided estimate whose gradient is d rho itself once its planes converge, 16-40
  # steps on the blocks measured, "radius" before; twice the products) or
  # "frobenius" (Hutchinson's estimate of ||J||_F^2 / n, the mean squared singular value).
  contractive_kind: str = "spectral"
  # Where J is taken: "iterate" (a random Picard iterate g_k, k <= iterations) or
  # "solution" (the block's answer in the forward pass: no extra map evaluations).
  contractive_point: str = "iterate"
  # Level the spectral/radius penalty aims below (< 1 makes the Picard map a contraction):
  # one number for every block, or one per block (a block whose radius grows most from
  # the training crops to full images can be held lower).
  contractive_target: Union[float, tuple[float, ...]] = 0.9
  # Power-iteration steps of the spectral (one jvp + one vjp each) or radius (one jvp)
  # estimate (radius_exact: one jvp and one vjp each), or Hutchinson probes (one jvp each)
  # of the Frobenius one.
  contractive_iters: int = 4
  # Training only: weight of the fixed-point correction loss, the reconstruction loss of
  # the output decoded from one map step after a random earlier iterate of every block.
  correction_weight: float = 0.0
  # Compute dtype of convolutions; parameters and normalisation statistics stay float32.
  dtype: str = "float32"
  # Precision of the dense convolutions (a RUNTIME_FIELD): "highest" (exact float32;
  # parity with PyTorch on GPUs that would otherwise use TF32) or "default" (fastest the
  # backend offers: TF32 on recent NVIDIA GPUs, bfloat16 products with float32 sums
  # under oneDNN on CPUs with AVX512-BF16 or AMX; the shared smoothing stays exact).
  precision: str = "highest"
  # Who runs the convolutions: one of CONV_BACKENDS (a RUNTIME_FIELD). At precision
  # "highest" the results agree to float32 rounding; oneDNN's CPU kernels make a
  # training step faster (docs/TRAINING.md, "Speed of a training step": the figures and
  # the commands). Programs using them cannot be serialised with jax.export: use "xla"
  # for that.
  conv_backend: str = "auto"


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))
SOLVE_FIELDS = tuple(f.name for f in dataclasses.fields(Solve))


@dataclasses.dataclass(frozen=True)
class ModelConfig(Solve, Architecture):
  """MI-Net: its `Architecture` and how it is run (`Solve`), as one flat record.

  Defaults reproduce the authors' released checkpoint. Fields are defined (and
  documented) once, in the two records above.
  """

  def __post_init__(self) -> None:
    # Normalise list-valued fields (ml_collections and JSON give lists) so the record hashes.
    object.__setattr__(self, "dilations", _integers("dilations", self.dilations))
    if is_integer(self.iterations):
      # One number of iterations for every block (e.g. --max-steps).
      object.__setattr__(self, "iterations", (self.iterations,) * len(self.dilations))
    object.__setattr__(self, "iterations", _integers("iterations", self.iterations))
    object.__setattr__(self, "stage_fraction", self._per_block("stage_fraction"))
    object.__setattr__(self, "contractive_target", self._per_block("contractive_target"))
    object.__setattr__(self, "stages", self._stage_counts())
    # Types first, so a string or a NaN gets its own message instead of a failed comparison
    # below or a NaN model later (NaN passes no comparison, so it would slip through them).
    for name in ("features", "pre_blocks", "anderson_m", "adjoint_max_steps",
                 "contractive_iters", "phantom_steps"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
      # Plain Python values: a numpy or JAX scalar passes the check but is no JSON (the
      # config.json of a checkpoint).
      object.__setattr__(self, name, int(value))
    for name in ("eta", "rtol", "atol", "anderson_beta", "anderson_reg", "adjoint_rtol",
                 "adjoint_atol", "contractive_weight", "norm_eps",
                 "leaky_slope", "init_kaiming_a", "phantom_damping", "correction_weight"):
      value = getattr(self, name)
      if (not isinstance(value, numbers.Real) or isinstance(value, bool)
          or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
      object.__setattr__(self, name, float(value))
    for name in ("smoothed_dilation", "best_so_far"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):  # "False" would be true.
        raise ValueError(f"{name} must be True or False, got {value!r}")
      object.__setattr__(self, name, bool(value))
    if not (self.eta > 0 and self.norm_eps > 0):
      raise ValueError(f"eta and norm_eps must be > 0, got eta={self.eta}, "
                       f"norm_eps={self.norm_eps}")
    if self.dtype == "float16":
      # The convolutions before MI-Net's instance norms are free to grow (the norm removes
      # their scale), and trained weights use that: the released ones reach 7e4 inside the
      # second IM-block and 3e8 before the decoder's first norm, past float16's 65504.
      raise ValueError("dtype 'float16' is not supported: MI-Net's convolution outputs "
                       "exceed its range (65504; the released weights reach 3e8) and become "
                       "inf/NaN; use 'bfloat16' (float32's range) for fast inexact compute")
    if self.features < 1 or self.pre_blocks < 0:
      raise ValueError(f"features must be >= 1 and pre_blocks >= 0, got {self.features}, "
                       f"{self.pre_blocks}")
    if len(self.iterations) != len(self.dilations) or not self.iterations:
      raise ValueError("iterations and dilations need one entry per IM-block and the same "
                       f"length, got iterations={self.iterations}, dilations={self.dilations}")
    if any(t < 0 for t in self.iterations):
      raise ValueError(f"iterations must be >= 0, got {self.iterations}")
    if any(d < 1 for d in self.dilations):
      raise ValueError(f"dilations must be >= 1, got {self.dilations}")
    if self.input_format not in INPUT_FORMATS:
      raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
    if self.conv_backend not in CONV_BACKENDS:
      raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {self.conv_backend!r}")
    if self.pad_mode not in ("edge", "reflect"):
      raise ValueError(f"pad_mode must be 'edge' or 'reflect', got {self.pad_mode!r}")
    if self.solver not in SOLVERS:
      raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
    if self.backward not in BACKWARDS:
      raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
    if self.contractive_kind not in CONTRACTIVE_KINDS:
      raise ValueError(f"contractive_kind must be one of {CONTRACTIVE_KINDS}, got "
                       f"{self.contractive_kind!r}")
    if self.contractive_point not in CONTRACTIVE_POINTS:
      raise ValueError(f"contractive_point must be one of {CONTRACTIVE_POINTS}, got "
                       f"{self.contractive_point!r}")
    if (isinstance(self.phantom_steps, bool) or int(self.phantom_steps) != self.phantom_steps
        or self.phantom_steps < 1 or not 0.0 < self.phantom_damping <= 1.0):
      raise ValueError(f"phantom_steps must be an integer >= 1 and phantom_damping in (0, 1], "
                       f"got {self.phantom_steps}, {self.phantom_damping}")
    for name in ("rtol", "atol", "anderson_reg", "adjoint_rtol", "adjoint_atol",
                 "contractive_weight", "correction_weight"):
      if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
        raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
    if self.anderson_m < 1 or not 0.0 < self.anderson_beta <= 1.0:
      raise ValueError(f"anderson_m must be >= 1 and anderson_beta in (0, 1], got "
                       f"{self.anderson_m}, {self.anderson_beta}")
    if self.adjoint_max_steps < 0 or self.contractive_iters < 1:
      raise ValueError(f"adjoint_max_steps must be >= 0 and contractive_iters >= 1, got "
                       f"{self.adjoint_max_steps}, {self.contractive_iters}")
    if any(n == 2 and s == 1.0 for n, s in zip(self.stages, self.stage_fraction)):
      raise ValueError(f"a two-stage block needs a stage_fraction below 1 (at 1 both stages "
                       f"are the same implicit Euler step), got stages={self.stages}, "
                       f"stage_fraction={self.stage_fraction}")
    if (self.backward == "phantom" and self.phantom_damping < 1.0
        and min(self.stage_fraction) < 1.0):
      # A stage block answers g0 + (k - g0) / s: the damped steps' tangent of k carries
      # (1 - damping)^steps of g0's identity too few, which 1 / s magnifies, down to a
      # gradient of the wrong sign through the block (damping < 1 - s, one step).
      raise ValueError("phantom_damping below 1 is defined for implicit Euler blocks "
                       "(stage_fraction 1) only: a stage block's answer divides the "
                       "damped steps' gradient error by the stage fraction; got "
                       f"phantom_damping={self.phantom_damping}, "
                       f"stage_fraction={self.stage_fraction}")
    if (self.contractive_weight and self.contractive_point == "iterate"
        and max(self.stages) > 1):
      # The random iterate is one of a block's first stage only.
      raise ValueError("a penalty at random Picard iterates (contractive_point 'iterate') "
                       "is defined for one-stage blocks only; penalise two-stage blocks at "
                       f"their solutions ('solution'), got stages={self.stages}")
    if self.correction_weight and max(self.stages) > 1:
      # Its early outputs are one map step after an iterate of a block's only stage.
      raise ValueError("the fixed-point correction loss (correction_weight > 0) is defined "
                       f"for one-stage blocks only, got stages={self.stages}")
    object.__setattr__(self, "unroll", canonical_unroll("ModelConfig", self.unroll))
    if self.dtype == "bfloat16" and self.solver != "unrolled" and self.rtol < BF16_RTOL_FLOOR:
      warnings.warn(
          f"solver {self.solver!r} at rtol {self.rtol:g} with dtype 'bfloat16': iterates "
          "stored in bfloat16 keep a relative residual of about bfloat16's rounding "
          "(1.5e-3 to 2.5e-3 measured), so most solves run to their step cap; use rtol >= "
          f"{BF16_RTOL_FLOOR:.1e} with bfloat16, or float32", stacklevel=_outside_stacklevel())

  def _per_block(self, name: str) -> tuple[float, ...]:
    """Field ``name`` as one float per IM-block: given as one number for every block or
    one per block (a list from ml_collections or JSON), and range-checked."""
    value = getattr(self, name)
    bad = ValueError(f"{name} must be a number or one number per IM-block, got {value!r}")
    if isinstance(value, (*_NOT_SEQUENCES, bool)) or value is None:
      raise bad
    try:
      array = np.asarray(value)
    except (TypeError, ValueError):
      raise bad from None
    if array.ndim > 1 or array.dtype.kind not in "fiu":
      raise bad
    values = (float(array),) * len(self.dilations) if array.ndim == 0 else tuple(
        float(v) for v in array)
    if name == "stage_fraction" and not all(MIN_STAGE_FRACTION <= v <= 1.0 for v in values):
      # The answer divides the stage's step by the fraction: a tiny one amplifies the
      # stage's rounding and tolerance without bound (and 0 divides by zero).
      raise ValueError(f"stage_fraction must lie in [{MIN_STAGE_FRACTION}, 1] (1: implicit "
                       f"Euler), got {value!r}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
      raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if len(values) != len(self.dilations):
      raise ValueError(f"{name} needs one entry per IM-block ({len(self.dilations)}), "
                       f"got {value!r}")
    return values

  def _stage_counts(self) -> tuple[int, ...]:
    """``stages`` as one count per IM-block, each one of STAGE_COUNTS."""
    value = self.stages
    values = (value,) * len(self.dilations) if isinstance(value, numbers.Integral) else value
    if (isinstance(value, _NOT_SEQUENCES) or not isinstance(
        values, (tuple, list)) or any(isinstance(n, bool) or not isinstance(n, numbers.Integral)
                                      or n not in STAGE_COUNTS for n in values)):
      raise ValueError(f"stages must be one of {STAGE_COUNTS}, or one of them per IM-block, "
                       f"got {value!r}")
    if len(values) != len(self.dilations):
      raise ValueError(f"stages needs one entry per IM-block ({len(self.dilations)}), "
                       f"got {value!r}")
    return tuple(int(n) for n in values)

  @property
  def num_blocks(self) -> int:
    return len(self.dilations)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly dict (tuples become lists). ``stage_fraction`` is left out while
    every block is implicit Euler (its default), ``stages`` while every block has one,
    and a ``contractive_target`` common to all blocks is one number, so that records of
    such models, the released one included, stay readable by minet-jax versions before
    those fields took these forms."""
    record = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(self).items()}
    if all(v == 1.0 for v in self.stage_fraction):
      del record["stage_fraction"]
    if all(n == 1 for n in self.stages):
      del record["stages"]
    if len(set(self.contractive_target)) == 1:
      # One target for every block is written as the one number it was before the field
      # took one per block.
      record["contractive_target"] = self.contractive_target[0]
    return record

  def architecture(self) -> dict[str, Any]:
    """The `Architecture` fields as a JSON-friendly dict: what runs compare."""
    return {k: v for k, v in self.to_dict().items() if k in ARCHITECTURE_FIELDS}

  def stored(self) -> dict[str, Any]:
    """`to_dict` without the RUNTIME_FIELDS: what checkpoints store."""
    return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

  def solve_settings(self) -> dict[str, Any]:
    """The `Solve` fields a checkpoint stores (no RUNTIME_FIELDS): how it was trained to run."""
    return {k: v for k, v in self.stored().items() if k in SOLVE_FIELDS}

  def same_architecture(self, other: ModelConfig) -> bool:
    """Whether `other` describes the same weights (whatever the solve settings)."""
    return self.architecture() == other.architecture()

  def fixed_architecture(self) -> dict[str, Any]:
    """`architecture` without the INIT_FROM_FREE_FIELDS: what weights started from
    (``init_from``) must match."""
    return {k: v for k, v in self.architecture().items() if k not in INIT_FROM_FREE_FIELDS}

  def same_weights(self, other: ModelConfig) -> bool:
    """Whether `other` describes the same weights, perhaps in other roles: the same
    architecture but for the INIT_FROM_FREE_FIELDS (what ``init_from`` may start from)."""
    return self.fixed_architecture() == other.fixed_architecture()


def _outside_stacklevel() -> int:
  """The ``stacklevel`` of a warning raised here that names the first caller outside
  minet_jax and dataclasses (`dataclasses.replace`, `Params.replace_config`, the tools),
  however many of their frames lie between (a dataclass's generated ``__init__`` runs
  in its module's globals)."""
  frame, level = sys._getframe(1), 1
  while frame is not None:
    module = frame.f_globals.get("__name__", "")
    if not (module in ("minet_jax", "dataclasses") or module.startswith("minet_jax.")):
      break
    frame, level = frame.f_back, level + 1
  return level


# What iterates but is no list of per-block values, whatever it iterates as: strings,
# mappings and sets.
_NOT_SEQUENCES = (str, bytes, Mapping, set, frozenset)


def _integers(name: str, value: Any) -> tuple[int, ...]:
  """``value``, a sequence of integers (numpy's too; a bool is none), as a tuple of ints."""
  if isinstance(value, _NOT_SEQUENCES):
    values = None
  else:
    try:
      values = tuple(value)
    except TypeError:
      values = None
  if values is None or not all(is_integer(v) for v in values):  # Ranges: the caller's.
    raise ValueError(f"{name} must be integers, one per IM-block, got {value!r}")
  return tuple(operator.index(v) for v in values)


def is_count(value: Any, minimum: int = 1) -> bool:
  """Whether `value` is an integer (a bool is not one) of at least `minimum`: the one
  check of the counts that configs, command lines and records give."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def is_positive_number(value: Any) -> bool:
  """Whether `value` is a finite real number > 0 (a bool is not one): factors and scales."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def block_indices(blocks: Any, num_blocks: int, name: str = "blocks") -> list[int]:
  """``blocks`` (0-based IM-block indices, or None for all) as a sorted list without
  repeats; raises ValueError naming ``name`` unless it names one or more blocks."""
  chosen = list(range(num_blocks)) if blocks is None else sorted(set(blocks))
  if not chosen or any(not is_count(i, 0) or i >= num_blocks for i in chosen):
    raise ValueError(f"{name} {blocks!r} must name one or more of the {num_blocks} "
                     "IM-blocks (0-based)")
  return chosen


def paper_text_variant(**overrides: Any) -> ModelConfig:
  """The architecture as the paper's text describes it: T = 12, dilations 1/2/5."""
  return ModelConfig(**{"iterations": (12, 12, 12), "dilations": (1, 2, 5), **overrides})


ConfigLike = Union[None, ModelConfig, Mapping[str, Any], ml_collections.ConfigDict]


def model_config(config: ConfigLike = None) -> ModelConfig:
  """Builds a `ModelConfig` from None (released), a `ModelConfig`, or a (Config)dict.

  A full training config with a ``model`` section is accepted as well as the section.
  Unknown keys are an error, so a typo never silently falls back to a default.
  """
  if config is None:
    return ModelConfig()
  if isinstance(config, ModelConfig):
    return config
  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be None, a ModelConfig or a mapping, got {type(config).__name__}")
  if "model" in config and isinstance(config["model"], (Mapping, ml_collections.ConfigDict)):
    return model_config(config["model"])
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
  return ModelConfig(**dict(config))


def program_name(module: str, argv0: str | None = None) -> str:
  """What a tool's usage line calls it: the console script's name (``minet-dehaze``) when
  run as one, else ``python -m <module>`` (``argv0`` defaults to ``sys.argv[0]``)."""
  name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
  return f"python -m {module}" if not name or name.endswith(".py") or name == "-c" else name


def _step_cap(text: str) -> int:
  """--max-steps: an integer >= 1 (the config allows 0, which skips the IM-blocks)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return value


@contextlib.contextmanager
def warnings_as_notes(prefix: str, say: Callable[[str], None] | None = None
                      ) -> Iterator[None]:
  """Within, a warning (a setting that will run badly, e.g. bfloat16 at a tight rtol) is
  given when raised as one note, ``prefix`` and its message (``"dehaze: note: "``), to
  ``say`` (default: a line on stderr), as a tool's other notes are, rather than as a
  Python warning with a source line. Meant around loading a model, not a whole run."""
  def show(message, category, filename, lineno, file=None, line=None) -> None:
    del category, filename, lineno, file, line
    text = f"{prefix}{message}"
    if say is None:
      print(text, file=sys.stderr)
    else:
      say(text)
  with warnings.catch_warnings():
    warnings.showwarning = show
    yield


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds how a tool runs the model (`Solve` fields) to its parser: --dtype and
  --precision (speed), --solver, --rtol and --max-steps (how the IM-blocks are solved)."""
  group = parser.add_argument_group(
      "speed", "faster, inexact inference (docs/PRETRAINED.md); default: the checkpoint's "
      "settings, exact float32 for the released model")
  group.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="'default': bfloat16 products with float32 sums on CPUs with "
                          "AVX512-BF16 or AMX (TF32 on NVIDIA GPUs)")
  group.add_argument("--dtype", choices=DTYPES, default=None,
                     help="compute dtype of the convolutions and the features between them "
                          "(float16 is refused: MI-Net's activations exceed its range)")
  add_solve_arguments(parser)


def add_solve_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --solver, --rtol and --max-steps (how the IM-blocks are solved) to a parser;
  `speed_changes` reads them."""
  solve = parser.add_argument_group(
      "solve", "how the IM-blocks are solved (docs/STABILITY.md); default: as the checkpoint "
      "was trained (the released model: 8 unrolled steps)")
  solve.add_argument("--solver", choices=SOLVERS, default=None,
                     help="'unrolled': exactly --max-steps steps; 'picard'/'anderson': until "
                          "the relative residual meets --rtol")
  solve.add_argument("--rtol", type=float, default=None, help="tolerance of the solve")
  solve.add_argument("--max-steps", type=_step_cap, default=None, dest="iterations",
                     help="map evaluations per IM-block and stage (the cap of a solve to "
                          "tolerance; a two-stage block may take twice as many)")


# The command-line option of each ModelConfig field `speed_changes` reads.
_SPEED_OPTIONS = {"precision": "--precision", "dtype": "--dtype", "solver": "--solver",
                  "rtol": "--rtol", "iterations": "--max-steps"}


def speed_changes(args: argparse.Namespace) -> dict[str, Any]:
  """The ModelConfig changes `add_speed_arguments`' (or `add_solve_arguments`') options
  ask for (`Params.replace_config`)."""
  return {name: getattr(args, name) for name in _SPEED_OPTIONS
          if getattr(args, name, None) is not None}


def checked_speed_changes(args: argparse.Namespace) -> dict[str, Any]:
  """`speed_changes`, checked on their own before any model is loaded: a ValueError
  that names the options given (``--rtol: rtol must be finite and >= 0, ...``)."""
  changes = speed_changes(args)
  try:
    with warnings.catch_warnings():  # Checked on the defaults: warnings belong to the model.
      warnings.simplefilter("ignore")
      ModelConfig(**changes)
  except ValueError as e:
    raise ValueError(f"{' / '.join(_SPEED_OPTIONS[n] for n in changes)}: {e}") from None
  return changes


def unused_speed_options(changes: Mapping[str, Any], cfg: ModelConfig) -> str | None:
  """A note when ``changes`` (`speed_changes`) set ``--rtol`` but ``cfg`` (the model as it
  will run) solves by a fixed number of steps, which no tolerance changes; else None."""
  if changes.get("rtol") is None or stops_at_tolerance(cfg.solver):
    return None
  return (f"--rtol has no effect: the IM-blocks run {cfg.solver} (a fixed number of "
          "steps, --max-steps); --solver picard or anderson solves to a tolerance")
