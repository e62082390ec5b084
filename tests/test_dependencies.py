"""The dependency promises the README makes: compatible ranges in pyproject.toml, one exact
set in constraints.txt that CI and the README install."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).parent.parent


def _project() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> list[Requirement]:
  """Every requirement of pyproject.toml: the dependencies and each extra's."""
  project = _project()
  lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values()
                                     for line in extra]
  return [Requirement(line) for line in lines]


def _pins() -> dict[str, str]:
  """constraints.txt as name -> exact version."""
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, sep, version = line.partition("==")
      assert sep and version and ";" not in line, f"not an exact pin: {line!r}"
      pins[canonicalize_name(name)] = version
  return pins


def test_tensorflow_is_not_a_dependency():
  assert importlib.util.find_spec("tensorflow") is None, (
      "TensorFlow got installed; the datasets must be read with tfds.data_source + grain only")


def test_pyproject_declares_ranges_and_a_cpu_only_default():
  reqs = _project()["dependencies"]
  assert not any("cuda" in line or line.startswith(("tensorflow=", "torch")) for line in reqs)
  for req in map(Requirement, reqs):
    # A range that others can share an environment with: a tested floor and a ceiling.
    ops = {spec.operator for spec in req.specifier}
    assert ops == {">=", "<"}, f"{req}: want >= and < bounds"
  extras = _project()["optional-dependencies"]
  assert set(extras) == {"test", "onednn", "cuda"}
  assert any("jax[cuda" in line for line in extras["cuda"])  # the GPU build is opt-in
  # The kernels are compiled against exactly this oneDNN release.
  assert all("==2023.2.0" in line for line in extras["onednn"])


def test_constraints_pin_every_declared_package_inside_its_range():
  pins = _pins()
  for req in _declared():
    if req.name == "jax" and "cuda12" in req.extras:
      continue  # the GPU extra is not part of the CPU set CI installs
    name = canonicalize_name(req.name)
    assert name in pins, f"constraints.txt has no pin for {req.name}"
    assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req}"


def test_requirements_txt_installs_the_project_under_the_constraints():
  # The README's install command and .ci/run: the checkout with its test and oneDNN
  # extras, every package at the version constraints.txt pins.
  lines = [line.split("#")[0].strip() for line in
           (ROOT / "requirements.txt").read_text().splitlines()]
  assert [line for line in lines if line] == ["-c constraints.txt", "-e .[test,onednn]"]
  assert "pip install --quiet -r requirements.txt" in (ROOT / ".ci" / "run").read_text()


def test_installed_versions_are_in_range_and_ci_runs_the_pinned_set():
  pins = _pins()
  for req in _declared():
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
      continue
    if "cuda12" in req.extras:
      continue
    try:
      installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      continue  # an extra this environment did not install
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed}: {req}"
    if os.environ.get("CI", "").lower() == "true":
      assert installed == pins[canonicalize_name(req.name)], (req.name, installed)
