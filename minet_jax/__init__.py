"""minet-jax: MI-Net (implicit Euler ODE networks for single-image dehazing) in JAX.

    import minet_jax
    params = minet_jax.pretrained("its")             # the authors' weights, downloaded once
    clear = minet_jax.apply(params, hazy_rgb_uint8)  # float32 RGB in [0, 1]
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

from minet_jax.core import checkpoint as _checkpoint
from minet_jax.core.api import apply, apply_checked
from minet_jax.core.checkpoint import CheckpointError, load_config, save
from minet_jax.core.config import ModelConfig, model_config, paper_text_variant
from minet_jax.core.model import MINet
from minet_jax.core.params import Params, init, model_from_params, params_from_model

if TYPE_CHECKING:  # For type checkers and IDEs; at run time `__getattr__` imports it.
  from minet_jax.hub import pretrained

__all__ = [
    "CheckpointError",
    "MINet",
    "ModelConfig",
    "Params",
    "apply",
    "apply_checked",
    "init",
    "load",
    "load_config",
    "model_config",
    "model_from_params",
    "paper_text_variant",
    "params_from_model",
    "pretrained",
    "save",
]

__version__ = "0.1.0"


def load(path: str | os.PathLike) -> Params:
  """Reads MI-Net weights: a checkpoint folder (`save`, ``minet-convert``), a training
  workdir (its best-validation, else latest, weights), or an authors' PyTorch ``.pth``
  file, converted in memory by the torch-free reader (`minet_jax.hub.load_pth`).

  Raises `CheckpointError` (see `minet_jax.core.checkpoint.load`) when it cannot.
  """
  if pathlib.Path(path).expanduser().is_file():
    # The package reaches the reader (a tool) only when asked: `import minet_jax` and
    # loading a folder stay within the core.
    from minet_jax.hub import load_pth
    return load_pth(pathlib.Path(path).expanduser())
  return _checkpoint.load(path)


def __getattr__(name: str) -> Any:
  if name == "pretrained":  # minet_jax.pretrained("its"): imported on first use only.
    from minet_jax.hub import pretrained
    return pretrained
  raise AttributeError(f"module 'minet_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | {"pretrained"})
