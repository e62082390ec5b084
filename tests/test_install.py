"""The package installs with pip (pyproject.toml) and its console scripts work."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_console_scripts_name_functions_of_the_package():
  assert set(SCRIPTS) == {"minet-dehaze", "minet-convert", "minet-evaluate", "minet-train",
                          "minet-stability"}
  for target in SCRIPTS.values():
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function)), target


def _can_build_offline() -> bool:
  """setuptools >= 70.1 (or an older one with `wheel`) builds a wheel with no download."""
  if importlib.util.find_spec("setuptools") is None:
    return False
  import setuptools
  major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
  return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _not_the_checkout(entry: str) -> bool:
  """A sys.path folder other than the checkout's root (where ``minet_jax/`` would be found);
  a virtual environment inside the checkout (CI's) is kept."""
  path = pathlib.Path(entry or ".").resolve()
  return path.is_dir() and path != REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """A fresh virtual environment with the checkout pip-installed in it; its bin folder.

  The environment sees this interpreter's packages (jax and the rest, pip, setuptools)
  through a .pth file, but not the checkout, so what it imports of minet_jax is what pip
  installed. No download: no dependencies, no build isolation.
  """
  if not _can_build_offline():
    message = ("setuptools >= 70.1 is needed to build the package offline "
               "(pip install -r requirements.txt brings it)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)
  root = tmp_path_factory.mktemp("venv") / "env"
  try:
    venv.EnvBuilder(with_pip=False).create(root)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot create a virtual environment here: {e}")
  python = root / "bin" / "python"
  purelib = subprocess.run(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip()
  ours = [entry for entry in sys.path if _not_the_checkout(entry)]
  (pathlib.Path(purelib) / "outer_environment.pth").write_text("\n".join(ours) + "\n")
  # pip builds a local folder in place (build/, *.egg-info): build a copy of what it reads.
  source = root.parent / "source"
  shutil.copytree(REPO / "minet_jax", source / "minet_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  result = subprocess.run(
      [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
       "--ignore-installed", "--no-input", "--quiet", str(source)],
      capture_output=True, text=True, cwd=root, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  return root / "bin"


def test_import_resolves_to_the_installed_copy(installed):
  result = subprocess.run(
      [str(installed / "python"), "-c",
       "import importlib.metadata, minet_jax; "
       "print(minet_jax.__file__); print(importlib.metadata.version('minet-jax'))"],
      capture_output=True, text=True, cwd=installed.parent, timeout=300)
  assert result.returncode == 0, result.stderr
  path, version = result.stdout.split()
  assert pathlib.Path(path).is_relative_to(installed.parent / "lib"), path
  assert "site-packages" in pathlib.Path(path).parts
  import minet_jax
  assert version == minet_jax.__version__


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help(installed, script):
  result = subprocess.run([str(installed / script), "--help"], capture_output=True, text=True,
                          cwd=installed.parent, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.lower().startswith("usage:"), result.stdout[:500]


def test_installed_train_reads_a_config_relative_to_the_current_folder(installed, tmp_path):
  # configs/tiny.py, loaded by its path relative to the current folder, imports the base
  # config from the installed package. An unknown field fails after loading.
  result = subprocess.run(
      [str(installed / "minet-train"), "--config", "configs/tiny.py", "--workdir",
       str(tmp_path / "w"), "--config.bogus=1"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode != 0
  assert "unknown config field" in result.stderr, result.stderr
  assert not (tmp_path / "w").exists()
