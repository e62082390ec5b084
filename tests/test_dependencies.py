"""The dependency promises the README makes."""

from __future__ import annotations

import importlib.util
import pathlib


def test_tensorflow_is_not_a_dependency():
  assert importlib.util.find_spec("tensorflow") is None, (
      "TensorFlow got installed; the datasets must be read with tfds.data_source + grain only")


def test_requirements_are_pinned_and_cpu_only():
  lines = [line.split("#")[0].strip() for line in
           (pathlib.Path(__file__).parent.parent / "requirements.txt").read_text().splitlines()]
  reqs = [line for line in lines if line]
  assert all("==" in line for line in reqs), reqs
  assert not any("cuda" in line or line.startswith(("tensorflow==", "torch")) for line in reqs)
