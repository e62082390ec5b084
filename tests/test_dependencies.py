"""The dependency promises the README makes."""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).parent.parent


def _project() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_tensorflow_is_not_a_dependency():
  assert importlib.util.find_spec("tensorflow") is None, (
      "TensorFlow got installed; the datasets must be read with tfds.data_source + grain only")


def test_requirements_are_pinned_and_cpu_only():
  reqs = _project()["dependencies"]
  assert reqs and all("==" in line for line in reqs), reqs
  assert not any("cuda" in line or line.startswith(("tensorflow==", "torch")) for line in reqs)
  extras = _project()["optional-dependencies"]
  assert all("==" in line for extra in extras.values() for line in extra), extras
  assert any("cuda" in line for line in extras["cuda"])  # the GPU build is opt-in


def test_requirements_txt_only_installs_the_project():
  # One list of dependencies: pyproject.toml. requirements.txt (the README's install
  # command and .ci/run) installs the checkout with its test extra.
  lines = [line.split("#")[0].strip() for line in
           (ROOT / "requirements.txt").read_text().splitlines()]
  assert [line for line in lines if line] == ["-e .[test]"]
