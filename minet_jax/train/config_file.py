"""Training config files (``configs/*.py``) loaded by their path.

A config file imports the base config from the package (``from minet_jax.train import
defaults``) and a sibling config by path (`load_module`), so it loads wherever it lies,
with ``sys.path`` left as it is. ``train.py --config`` loads the file the same way
(``ml_collections.config_flags``); `load_module` is for scripts that need a config's
``get_config`` without the flags.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """Runs the config file ``path`` as a module of its own (not entered in ``sys.modules``)
  and returns it, for its ``get_config()``; FileNotFoundError when there is no such file."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"no config file {path}")
  spec = importlib.util.spec_from_file_location(f"minet_config_file_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
