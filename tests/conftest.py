"""Shared pytest fixtures.

Reference data (the authors' checkpoint, their outputs, RESIDE samples) lives in
``../shared`` beside a checkout, or wherever ``MINET_SHARED`` points. Tests that
need it skip when it is absent, except under ``CI=true``, where absence fails.
"""

from __future__ import annotations

import os
import pathlib
import platform
from collections.abc import Mapping

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MINET_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The reference-data folder; skips (or fails under CI=true) when absent."""
  path = shared_path()
  if not (path / "README.md").is_file():
    message = (f"reference data not found at {path} (set MINET_SHARED to the folder "
               "holding weights/, parity/ and data/)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def released_params(shared_dir, tmp_path_factory):
  """The authors' released checkpoint, converted by `minet_jax.convert` and loaded."""
  import minet_jax
  from minet_jax import convert
  out = tmp_path_factory.mktemp("released") / "minet_its"
  convert.convert(shared_dir / "weights" / "minet_its_official.pth", out)
  return minet_jax.load(out)


@pytest.fixture(scope="session")
def random_params():
  """Untrained parameters: ``random_params(config=None, seed=0)`` is
  ``minet_jax.init(config, seed=seed)`` (the authors' initialisation), made once per
  (config, seed) in a session, since each new architecture's init compiles for seconds.
  ``config`` is a `ModelConfig` or None (the released architecture)."""
  import minet_jax
  made: dict = {}

  def make(config=None, seed: int = 0):
    if (config, seed) not in made:
      made[config, seed] = minet_jax.init(config, seed=seed)
    return made[config, seed]

  return make


def checkout_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``env`` (default: this process's environment) whose PYTHONPATH starts with
  this checkout, so a child Python imports this checkout's package whatever the virtual
  environment has installed."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def require_onednn() -> None:
  """Skips unless minet_jax.core.onednn's kernels build here; fails instead under CI=true on
  x86-64 Linux, where the pinned oneDNN wheels exist and so must work."""
  from minet_jax.core import onednn
  try:
    onednn.ensure_available()
  except onednn.OneDNNUnavailable as e:
    if (os.environ.get("CI", "").lower() == "true" and platform.system() == "Linux"
        and platform.machine() == "x86_64"):
      pytest.fail(f"oneDNN kernels unavailable on x86-64 Linux: {e}")
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def onednn_kernels() -> None:
  """`require_onednn` as a fixture."""
  require_onednn()


@pytest.fixture(scope="module", params=["xla", "onednn"])
def conv_backend(request) -> str:
  """Each explicit `ModelConfig.conv_backend` in turn (oneDNN skipped where unavailable)."""
  if request.param == "onednn":
    require_onednn()
  return request.param


@pytest.fixture(scope="module")
def released_on_backend(released_params, conv_backend):
  """The released weights, convolutions run by each `conv_backend` in turn."""
  import dataclasses

  import minet_jax
  return minet_jax.Params(weights=released_params.weights, config=dataclasses.replace(
      released_params.config, conv_backend=conv_backend))
