"""Training config files (``configs/*.py``) loaded by path, with their own imports working.

The configs import each other as a package (``from configs import default``). That
resolves when the folder holding ``configs/`` is on ``sys.path``, as it is for
``python train.py`` run from a checkout (the script's folder), but not for the
``minet-train`` console script or a benchmark script; `make_importable` adds it.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import types


def import_root(path: str | os.PathLike) -> pathlib.Path:
  """The folder a config file's imports resolve from: the first folder above the file
  that is not a package (``repo/configs/its.py`` -> ``repo``)."""
  folder = pathlib.Path(path).resolve().parent
  while (folder / "__init__.py").is_file() and folder.parent != folder:
    folder = folder.parent
  return folder


def make_importable(path: str | os.PathLike) -> pathlib.Path:
  """Puts `import_root` of ``path`` on ``sys.path`` (last, so it never shadows the installed
  ``minet_jax`` or its dependencies) unless it is there already; returns that folder."""
  root = import_root(path)
  if not any(pathlib.Path(entry or ".").resolve() == root for entry in sys.path):
    sys.path.append(str(root))
  return root


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """Imports the config file ``path`` under its package name (``configs.its``), for its
  ``get_config()``."""
  path = pathlib.Path(path).resolve()
  root = make_importable(path)
  return importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
