"""Programs for GPUs from a machine without one: `apply` and a training step lowered with
`jax.export` for ``platforms=("cuda",)`` hold no CPU-only custom call and no host
callback, whichever `ModelConfig.conv_backend` built them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minet_jax
from configs import tiny
from minet_jax.train import state as state_lib
from minet_jax.train import step as step_lib

# What a GPU program may call besides StableHLO: nothing of this project's, no host code.
_TARGET = re.compile(r'(?:custom_call @|call_target_name = ")([\w.$-]+)')
_HOST = ("callback", "cpu", "lapack", "ducc", "minet_")


def _small_config(backend: str):
  config = tiny.get_config()
  config.model.features = 4
  config.model.iterations = (1, 1, 1)
  config.model.smoothed_dilation = True  # the shared smoothing conv too
  config.model.conv_backend = backend
  return config


def _custom_calls(exported: jax.export.Exported) -> set[str]:
  return set(_TARGET.findall(exported.mlir_module()))


@pytest.fixture(scope="module", params=["auto", "xla"])
def state(request):
  return state_lib.create_train_state(_small_config(request.param))


def _batch():
  rng = np.random.default_rng(0)
  return {"hazy": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32),
          "clear": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)}


def _assert_gpu_only(exported: jax.export.Exported) -> None:
  assert exported.platforms == ("cuda",)
  calls = _custom_calls(exported)
  assert not [c for c in calls if any(h in c.lower() for h in _HOST)], calls
  module = exported.mlir_module()
  assert "stablehlo.convolution" in module
  # precision="highest" (these models') is exact float32 on a GPU too: every product
  # says HIGHEST, or the GPU's default (TF32 on NVIDIA since Ampere) would round.
  products = [line.strip() for line in module.splitlines()
              if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
  assert products and not [p for p in products if "HIGHEST" not in p], [
      p[:160] for p in products if "HIGHEST" not in p]


def test_apply_exports_for_cuda(state):
  params = state.params()
  image = jnp.zeros((16, 20, 3), jnp.float32)
  _assert_gpu_only(jax.export.export(jax.jit(minet_jax.apply), platforms=("cuda",))(
      params, image))


def test_a_training_step_exports_for_cuda(state):
  step = step_lib.make_train_step("mse")
  _assert_gpu_only(jax.export.export(step, platforms=("cuda",))(state, _batch()))


@pytest.mark.usefixtures("onednn_kernels")
def test_the_check_sees_a_cpu_only_custom_call():
  # The same step for the CPU under "auto" carries oneDNN's custom call: what the tests
  # above would catch if it reached a GPU program.
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    pytest.skip("'auto' picks oneDNN on a single CPU device only")
  state = state_lib.create_train_state(_small_config("auto"))
  exported = jax.export.export(
      step_lib.make_train_step("mse"), platforms=("cpu",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("minet_onednn_conv")])(
          state, _batch())
  assert "minet_onednn_conv" in _custom_calls(exported)


def test_a_two_stage_model_exports_for_cuda():
  # Block 2 solves two stages to tolerance: two while loops, still GPU-only.
  config = _small_config("xla")
  config.model.stages = (1, 2, 1)
  config.model.stage_fraction = (1.0, 0.5, 1.0)
  config.model.solver = "picard"
  config.model.iterations = (3, 3, 3)
  params = state_lib.create_train_state(config).params()
  export = jax.export.export(jax.jit(minet_jax.apply), platforms=("cuda",))
  image = jnp.zeros((16, 20, 3), jnp.float32)
  exported = export(params, image)
  _assert_gpu_only(exported)
  one_stage = export(params.replace_config(stages=1), image)
  assert (exported.mlir_module().count("stablehlo.while")
          == one_stage.mlir_module().count("stablehlo.while") + 1)


@pytest.mark.parametrize("backend", ["auto", "onednn", "xla"])
def test_fast_products_are_the_gpus_own(backend):
  """precision="default" asks for the platform's fast products. A GPU program traced on
  a CPU got the CPU kernels' bfloat16 rounding (explicit converts) at HIGHEST, or plain
  HIGHEST where that CPU has no bfloat16: never the GPU's own (TF32)."""
  if backend == "onednn":
    from conftest import require_onednn
    require_onednn()
  if backend != "xla" and jax.default_backend() == "cpu":
    from minet_jax.core import onednn
    if onednn.use_onednn(backend, jnp.float32) and not onednn.bf16_products_for(
        jax.lax.Precision.DEFAULT):
      # A CPU without native bfloat16 traces its oneDNN convolutions as exact ones, and
      # the program keeps no trace that fast products were asked for.
      pytest.skip("this CPU has no native bfloat16: oneDNN's convolutions trace as exact")
  config = _small_config(backend)
  config.model.precision = "default"
  state = state_lib.create_train_state(config)
  for exported in (
      jax.export.export(jax.jit(minet_jax.apply), platforms=("cuda",))(
          state.params(), jnp.zeros((16, 20, 3), jnp.float32)),
      jax.export.export(step_lib.make_train_step("mse"), platforms=("cuda",))(
          state, _batch())):
    module = exported.mlir_module()
    assert "bf16" not in module
    # The dense convolutions (the depthwise smoothing, and its kernel gradient, a
    # batch-grouped one, stay exact by design).
    dense = [line for line in module.splitlines() if "stablehlo.convolution" in line
             and "feature_group_count = 1 " in line and "batch_group_count = 1 " in line]
    assert dense and not [line for line in dense if "HIGHEST" in line]
