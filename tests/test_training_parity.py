"""Training parity with the authors' code: losses, gradients and Adam steps.

``shared/parity/official_grads.npz`` holds what the authors' PyTorch code (their
``MINet.py`` in ``.train()`` mode, float32, CPU) computes from the released weights on
two 96x128 SOTS crops: both losses, the gradient of each for all 73 state-dict
tensors, and the weights after 1 and 3 ``torch.optim.Adam`` steps of their
``main.py`` (lr 0.01 on ``torch.norm(output - gt)``). Here the same quantities come
from the project's own training code: ``configs/its_authors.py``,
`create_train_state`, `loss_and_grads` and the jitted `make_train_step`.

Tolerances, and why:
* Losses: relative 1e-5. The forward pass agrees with the authors' to ~1e-6 of the
  pixel range; the losses sum 73,728 such errors.
* Gradients: each tensor's relative L2 error below 1e-2, and its cosine with the
  reference above 0.9999. The backward pass runs through 3 x 8 weight-tied iterations
  whose map expands (spectral radius up to ~3 on these crops, docs/STABILITY.md), so
  float32 rounding differences between two correct implementations grow to ~2e-3
  relative on the IM-block tensors; a wrong gradient (a missing term, a transposed
  kernel, a wrong loss scale) is off by O(1).
* The two biases that feed an instance norm (``deconv2.bias``, ``deconv3.bias``) have
  a true gradient of zero; both frameworks hold rounding noise there. They are compared
  by size: below 1e-6 of the norm of their layer's weight gradient on both sides.
* The channel gate (``layer1.*``): its sigmoid saturates in float32 on these crops, so
  both sides' gradients are exactly zero, and so must ours be.
* Adam, step 1: it moves each weight by lr * g / (|g| + eps), about lr * sign(g), so an
  element whose reference gradient is at noise level may step the other way. Elements
  whose gradient is clear of the noise (|g| above 1e-3 of the tensor's largest and 10x
  our discrepancy on that element) must land within 1e-5 of the reference (a step is
  1e-2; measured: 5e-7, float32 spacing near the weights); other elements may differ
  by a flipped step, and they must be rare: < 0.1 % on a CPU (measured 0.03 %), < 0.5 %
  on a GPU (measured 0.15 % on an NVIDIA H200).
* Adam, steps 2 and 3: see `test_adam_steps_match`; each tensor's displacement within
  10 % of the reference's, median over tensors within 3 %.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from configs import its_authors
from minet_jax.convert import torch_names
from minet_jax.train import state as state_lib
from minet_jax.train.step import loss_and_grads, make_train_step

pytestmark = pytest.mark.slow

LEARNING_RATE = 0.01
# Biases whose output goes straight into an instance norm (mean removed): zero gradient.
NORMALISED_BIASES = {"deconv2.bias": "deconv2.weight", "deconv3.bias": "deconv3.weight"}


@pytest.fixture(scope="module")
def reference(shared_dir):
  z = np.load(shared_dir / "parity" / "official_grads.npz")
  return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def config(conv_backend):
  config = its_authors.get_config()
  assert config.optimizer.learning_rate == LEARNING_RATE and config.loss == "l2"
  config.model.conv_backend = conv_backend
  return config


@pytest.fixture(scope="module")
def batch(reference):
  return {"hazy": jnp.asarray(reference["hazy_rgb"] / 255.0, jnp.float32),
          "clear": jnp.asarray(reference["clear_rgb"] / 255.0, jnp.float32)}


def torch_named(weights, cfg) -> dict[str, np.ndarray]:
  return torch_names.torch_state_dict_from_weights(weights, cfg)


@pytest.fixture(scope="module")
def ours(config, released_on_backend, batch):
  """Our losses, outputs and gradients (PyTorch names and layouts) at the released weights."""
  state = state_lib.create_train_state(config, released_on_backend)
  model, _ = state.merge()
  key = jax.random.key(0)
  losses = ("l2", "mse")
  # One program for both losses: the forward and backward passes are compiled once.
  both = nnx.jit(lambda m, b: [loss_and_grads(m, b, loss=loss, key=key) for loss in losses])
  results = {}
  for loss, ((value, (output, _)), grads) in zip(losses, both(model, batch)):
    # The gradient State has the parameters' structure: read it as a model's weights.
    grad_weights = minet_jax.params_from_model(nnx.merge(nnx.graphdef(model), grads)).weights
    results[loss] = (float(value), np.asarray(output),
                     torch_named(grad_weights, released_on_backend.config))
  return results


@pytest.mark.parametrize("loss", ["l2", "mse"])
def test_losses_match(ours, reference, loss):
  value, output, _ = ours[loss]
  assert value == pytest.approx(float(reference[f"loss_{loss}"]), rel=1e-5)
  np.testing.assert_allclose(output * 255.0, reference["output_rgb"], atol=5e-3)


@pytest.mark.parametrize("loss", ["l2", "mse"])
def test_gradients_match_every_tensor(ours, reference, loss):
  _, _, grads = ours[loss]
  assert len(grads) == 73
  report = []
  for name, got in grads.items():
    want = reference[f"grad_{loss}/{name}"]
    assert got.shape == want.shape, name
    if not np.any(want):
      # The channel gate's sigmoid saturates in float32: exactly zero on both sides.
      assert not np.any(got), name
      continue
    if name in NORMALISED_BIASES:
      scale = np.linalg.norm(reference[f"grad_{loss}/{NORMALISED_BIASES[name]}"])
      assert np.linalg.norm(got) < 1e-6 * scale, name
      assert np.linalg.norm(want) < 1e-6 * scale, name
      continue
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    cos = np.vdot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want))
    report.append((rel, name))
    assert rel < 1e-2 and cos > 0.9999, f"{name}: relative error {rel:.2e}, cosine {cos:.6f}"
  worst = max(report)
  print(f"{loss}: worst gradient relative error {worst[0]:.2e} ({worst[1]})")


def with_weights(state: state_lib.TrainState, weights: dict) -> state_lib.TrainState:
  """`state` with its model's weights replaced (Adam's moments and step kept)."""
  model, optimizer = state.merge()
  given = minet_jax.model_from_params(minet_jax.Params(weights=weights, config=model.config))
  nnx.update(model, nnx.state(given, nnx.Param))
  return state.replace(state=nnx.state((model, optimizer)))


def test_adam_steps_match(config, released_on_backend, batch, reference, ours):
  """1 and 3 steps of the project's jitted train step against torch.optim.Adam's.

  Step 1 starts from the released weights on both sides and must agree to float32
  rounding wherever the gradient's sign is clear. About 0.03 % of the elements (0.15 %
  on a GPU) have a noise-level gradient and step the other way (a 2 * lr difference),
  and those would steer the two runs' later gradients apart; so steps 2 and 3 start
  from the authors' weights after step 1 (with our Adam moments), and the test
  compares the two steps' displacement, tensor by tensor.
  """
  cfg = released_on_backend.config
  state = state_lib.create_train_state(config, released_on_backend)
  step = make_train_step(config.loss, ynn_fusions=config.xla_cpu_ynn_fusions)
  _, _, grads = ours["l2"]
  start = torch_named(released_on_backend.weights, cfg)
  state, _ = step(state, batch)
  after1 = torch_named(state.params().weights, cfg)
  flipped = 0
  for name, got in after1.items():
    want, g_ref = reference[f"adam1/{name}"], reference[f"grad_l2/{name}"]
    diff = np.abs(got - want)
    # Adam's first step moves each element by lr * g / (|g| + eps): never more than lr.
    ulp = 4 * np.finfo(np.float32).eps * np.abs(start[name])
    assert np.all(np.abs(got - start[name]) <= LEARNING_RATE + ulp), name
    clear = (np.abs(g_ref) > 1e-3 * np.abs(g_ref).max()) & (
        np.abs(g_ref) > 10 * np.abs(grads[name] - g_ref))
    if name in NORMALISED_BIASES:
      clear[...] = False
    assert np.all(diff[clear] <= 1e-5), (
        f"{name}: {np.sum(diff[clear] > 1e-5)} of {clear.sum()} elements with a clear "
        f"gradient off by up to {diff[clear].max():.2e}")
    flipped += int(np.sum(diff > 1e-5))
  print(f"adam1: {flipped} of 628078 elements off by more than 1e-5 (noise-level gradients)")
  # Measured: 0.03 % with XLA:CPU or oneDNN; 0.15 % on an NVIDIA H200, whose float32
  # convolutions (cuDNN) sum in other orders, so more gradients sit at noise level.
  assert flipped < (1e-3 if jax.default_backend() == "cpu" else 5e-3) * 628078

  state = with_weights(state, torch_names.weights_from_torch_state_dict(
      {name: reference[f"adam1/{name}"] for name in start}, cfg))
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  after3 = torch_named(state.params().weights, cfg)
  errors = {}
  for name, got in after3.items():
    want, before = reference[f"adam3/{name}"], reference[f"adam1/{name}"]
    if not np.any(reference[f"grad_l2/{name}"]):
      # The saturated channel gate: zero gradient, so Adam leaves it exactly as it was.
      np.testing.assert_array_equal(got, want, err_msg=name)
      continue
    if name in NORMALISED_BIASES:
      continue
    errors[name] = np.linalg.norm((got - before) - (want - before)) / np.linalg.norm(
        want - before)
  worst = max(errors, key=errors.get)
  print(f"adam3: displacement over steps 2-3 off by {np.median(list(errors.values())):.1e} "
        f"(median over tensors), worst {errors[worst]:.1e} ({worst})")
  # Measured: median 1e-2, worst 5e-2 (an encoder norm bias): the early layers' gradients
  # at the step-1 weights are the most sensitive to rounding (see the module docstring).
  assert errors[worst] < 0.1 and np.median(list(errors.values())) < 0.03
