"""Compute dtypes: bfloat16 under either precision, and the refused float16."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minet_jax
from minet_jax.core.config import checked_speed_changes
from minet_jax.core import onednn
from conftest import require_onednn

SMALL = minet_jax.ModelConfig(features=8, pre_blocks=1, iterations=(1, 1, 1))


@pytest.fixture(params=["native", "without_native_bf16"])
def bf16_cpu(request, monkeypatch) -> str:
  """Each bfloat16 branch in turn: oneDNN's native kernels (on CPUs with AVX512-BF16 or
  AMX; skipped elsewhere), and what a CPU without them does (XLA's convolutions)."""
  if request.param == "native":
    require_onednn()
    if not onednn.use_onednn("onednn", jnp.bfloat16):
      pytest.skip("this CPU has no native bfloat16 (AVX512-BF16/AMX)")
  else:
    use_onednn = onednn.use_onednn
    monkeypatch.setattr(onednn, "use_onednn", lambda backend, dtype=jnp.float32: (
        jnp.dtype(dtype) != jnp.bfloat16 and use_onednn(backend, dtype)))
  return request.param


def _run(params, x, **changes) -> tuple[np.ndarray, str]:
  model = minet_jax.model_from_params(params.replace_config(**changes))
  fn = jax.jit(lambda x: model(x))
  return np.asarray(fn(x)), fn.lower(x).as_text()


def test_bfloat16_at_precision_default_is_bfloat16(random_params, bf16_cpu):
  # bfloat16 operands already multiply in bfloat16 with float32 sums, all that
  # precision="default" asks for, so it changes nothing there. It used to raise
  # "bf16_products applies to float32 operands" on exactly the CPUs it is meant for.
  params = random_params(SMALL)
  x = jnp.asarray(np.random.default_rng(0).random((1, 16, 24, 3), np.float32))
  default, hlo = _run(params, x, dtype="bfloat16", precision="default")
  highest, _ = _run(params, x, dtype="bfloat16", precision="highest")
  exact, _ = _run(params, x)
  np.testing.assert_array_equal(default, highest)
  assert np.isfinite(default).all()
  # Really bfloat16 (not float32), and close to the float32 result.
  assert not np.array_equal(default, exact)
  assert np.linalg.norm(default - exact) <= 3e-2 * np.linalg.norm(exact)
  assert ("minet_onednn_conv" in hlo) == (bf16_cpu == "native")
  assert "bf16_products = 1" not in hlo


def test_float16_is_refused_with_the_reason():
  # float16's range (65504) is below what MI-Net's convolutions produce before their
  # instance norms: the released weights gave 100 % NaN, with no error.
  with pytest.raises(ValueError, match="float16.*not supported.*bfloat16") as e:
    minet_jax.ModelConfig(dtype="float16")
  assert "\n" not in str(e.value)


def test_float16_would_overflow_the_released_weights(released_params, shared_dir):
  # Why float16 is refused: the float32 activations that feed an instance norm exceed
  # float16's largest value on a real image, so no rounding scheme could fit them.
  from minet_jax import image_io
  model = minet_jax.model_from_params(released_params)
  image = image_io.read_rgb(shared_dir / "data/RESIDE/SOTS/indoor/hazy/1400_1.png")
  x = jnp.asarray(image[None, 100:196, 200:328])
  runs = model.solve_blocks(model.model_input(x))
  fused = model.fuse([r.output for r in runs])
  assert float(jnp.abs(model.deconv3(fused)).max()) > float(jnp.finfo(jnp.float16).max)


def test_a_tolerance_below_bfloat16s_rounding_is_warned_of(random_params):
  """bfloat16 iterates keep a relative residual of about 2e-3: at rtol 1e-3 a solve to
  tolerance runs to its step cap, spending every step."""
  with pytest.warns(UserWarning, match="rtol >= 4.0e-03") as caught:
    minet_jax.ModelConfig(dtype="bfloat16", solver="picard", rtol=1e-3)
    # Through dataclasses.replace and Params.replace_config, still at the caller's line.
    dataclasses.replace(minet_jax.ModelConfig(), dtype="bfloat16", solver="picard", rtol=1e-3)
    params = random_params(minet_jax.ModelConfig(features=4, pre_blocks=0))
    params.replace_config(dtype="bfloat16", solver="picard", rtol=1e-3)
  assert [w.filename for w in caught] == [__file__] * 3
  # The tools' check of their options alone (before the checkpoint's tolerance is known)
  # does not warn of the default's.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert checked_speed_changes(argparse.Namespace(solver="picard", dtype="bfloat16")) == {
        "solver": "picard", "dtype": "bfloat16"}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    minet_jax.ModelConfig(dtype="bfloat16", solver="picard", rtol=4e-3)
    minet_jax.ModelConfig(dtype="bfloat16")  # unrolled: the tolerance only labels status
    minet_jax.ModelConfig(solver="picard", rtol=1e-3)
