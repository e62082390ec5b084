"""minet-jax: MI-Net (implicit Euler ODE networks for single-image dehazing) in JAX.

    import minet_jax
    params = minet_jax.load("checkpoints/minet_its")   # or minet_jax.init()
    clear = minet_jax.apply(params, hazy_rgb_uint8)     # float32 RGB in [0, 1]
"""

from minet_jax.api import apply, apply_checked
from minet_jax.checkpoint import CheckpointError, load, load_config, save
from minet_jax.config import ModelConfig, model_config, paper_text_variant
from minet_jax.model import MINet
from minet_jax.params import Params, init, model_from_params, params_from_model

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
    "save",
]

__version__ = "0.1.0"
