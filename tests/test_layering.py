"""The import rule: core <- tools <- training, no circles, config.py imports only the
fixed-point engine (whose classes name the solvers), which imports nothing.

A module's layer is the folder it lives in: ``minet_jax/core/`` is the core,
``minet_jax/train/`` training, everything else in the package a tool, and
``minet_jax/__init__.py`` the facade (the core's names; tools only when called). A
module added to a folder takes that folder's rules, with no list to update.

The graph is read from the source (every ``import``, deferred ones included), so a
function-level import cannot hide an arrow the wrong way. The README's layout table is
checked against the same folders.
"""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minet_jax"
FACADE = "minet_jax"
# What each layer may import: the core only itself; the tools the core, each other and
# the facade; training everything; the facade the core (and tools inside functions).
MAY_IMPORT = {"core": {"core"}, "tools": {"core", "tools", "facade"},
              "training": {"core", "tools", "facade", "training"}, "facade": {"core", "tools"}}
_FOLDER_LAYERS = {"core": "core", "train": "training"}


def layer(module: str) -> str:
  """The layer of a package module (dotted name), from its folder."""
  if module == FACADE:
    return "facade"
  parts = module.split(".")
  assert parts[0] == FACADE and len(parts) > 1, module
  return _FOLDER_LAYERS.get(parts[1], "tools")


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
  parts = path.relative_to(package.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
  return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str], *,
             top_level_only: bool = False) -> set[str]:
  """Package modules `name` imports (``from pkg import sub`` counts as an arrow to sub)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  tree = ast.parse(path.read_text())
  for node in (tree.body if top_level_only else ast.walk(tree)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == FACADE}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([node.module] if node.module else []))
      if base.split(".")[0] != FACADE:
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in known else base)
  return out - {name}


def _graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  modules = _modules(package)
  return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
  """The arrows (importer, imported) that point the wrong way between layers."""
  return {(a, b) for a, deps in graph.items() for b in deps
          if layer(b) not in MAY_IMPORT[layer(a)]}


def test_graph_is_read():
  graph = _graph()
  assert "minet_jax.core.params" in graph["minet_jax.core.checkpoint"]
  assert "minet_jax.core.checkpoint" in graph["minet_jax.train.checkpointing"]
  assert "minet_jax.hub" in graph[FACADE]  # Read from a function body.


def test_layers_follow_the_folders():
  graph = _graph()
  assert layer("minet_jax.core.strips") == layer("minet_jax.core") == "core"
  assert layer("minet_jax.train.loop") == "training"
  assert layer("minet_jax.data.synthetic.scenes") == layer("minet_jax.hub") == "tools"
  assert {layer(m) for m in graph} == set(MAY_IMPORT)


def test_config_imports_only_the_fixed_point_engine():
  graph = _graph()
  assert graph["minet_jax.core.config"] == {"minet_jax.core.fixed_point"}
  assert graph["minet_jax.core.fixed_point"] == set()


def test_imports_point_one_way():
  """The core imports only the core (not the facade), the tools nothing of training."""
  assert not layer_violations(_graph())


@pytest.mark.parametrize("arrow", [
    ("minet_jax.core.new", "minet_jax.dehaze"), ("minet_jax.core.new", FACADE),
    ("minet_jax.core.new", "minet_jax.train.loop"), ("minet_jax.new", "minet_jax.train"),
    ("minet_jax.data.new", "minet_jax.train.state"), (FACADE, "minet_jax.train")])
def test_an_arrow_the_wrong_way_is_a_violation(arrow):
  graph = {**_graph(), arrow[0]: {arrow[1]}}
  assert layer_violations(graph) == {arrow}
  assert not layer_violations({**_graph(), "minet_jax.core.new": {"minet_jax.core.params"},
                               "minet_jax.train.new": {"minet_jax.dehaze", FACADE}})


def test_a_new_module_in_core_that_imports_a_tool_fails(tmp_path):
  """A module dropped into a copy of core/ takes the core's rule without being listed."""
  package = tmp_path / "minet_jax"
  shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
  (package / "core" / "shortcut.py").write_text("def f():\n  from minet_jax import dehaze\n")
  (package / "core" / "fine.py").write_text("from minet_jax.core import params\n")
  assert layer_violations(_graph(package)) == {("minet_jax.core.shortcut", "minet_jax.dehaze")}


def test_the_package_imports_its_on_demand_tools_only_inside_functions():
  path = PACKAGE / "__init__.py"
  everywhere = _graph()[FACADE]
  top_level = _imports(FACADE, path, set(_modules(PACKAGE)), top_level_only=True)
  assert top_level and {layer(m) for m in top_level} == {"core"}
  assert {layer(m) for m in everywhere - top_level} == {"tools"}


def test_no_import_circles():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done.

  def visit(node, path):
    state[node] = 1
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_load_and_apply_import_no_training_or_data_code(tmp_path):
  script = f"""
import sys
import numpy as np
import minet_jax
params = minet_jax.init({{"iterations": [1, 1, 1]}})
minet_jax.save(params, {str(tmp_path / "w")!r})
out = minet_jax.apply(minet_jax.load({str(tmp_path / "w")!r}), np.zeros((8, 8, 3), np.uint8))
heavy = ("minet_jax.train", "minet_jax.data", "minet_jax.hub", "minet_jax.convert", "tqdm",
         "grain", "tensorflow_datasets", "ml_collections.config_flags", "matplotlib")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------ the README's table


def _layout_table(text: str) -> list[tuple[str, list[str]]]:
  """(layer, paths) of each row of the README's "layer | file | job" table. In a file
  cell the first path is from the repository root; a bare name after it (``files.py``,
  ``csrc/``) is in the same folder."""
  lines = text.split("| layer | file | job |", 1)[1].splitlines()[2:]
  rows = []
  for line in lines:
    if not line.startswith("|"):
      break
    layer_cell, file_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
    names = re.findall(r"`([^`]+)`", file_cell)
    assert names, line
    first = names[0]
    folder = first if first.endswith("/") else first.rpartition("/")[0] + "/"
    rows.append((layer_cell, [first] + [folder + n if "/" not in n.rstrip("/") else n
                                        for n in names[1:]]))
  return rows


def _path_layer(path: str) -> str:
  """The layer a path of the checkout belongs to ("" outside the package)."""
  if not path.startswith(f"{FACADE}/"):
    return ""
  parts = pathlib.PurePosixPath(path).with_suffix("").parts
  return layer(".".join(parts[:-1] if parts[-1] == "__init__" else parts))


def _only_a_docstring(path: pathlib.Path) -> bool:
  body = ast.parse(path.read_text()).body
  return len(body) == 1 and isinstance(body[0], ast.Expr)


def _tracked_package_files() -> list[str]:
  listed = subprocess.run(["git", "ls-files", "minet_jax"], capture_output=True, text=True,
                          cwd=REPO)
  if listed.returncode != 0 or not listed.stdout.strip():
    return sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so")
  return sorted(listed.stdout.split())


def test_the_readme_layout_table_matches_the_folders():
  rows = _layout_table((REPO / "README.md").read_text())
  named = {}
  for row_layer, paths in rows:
    for path in paths:
      assert (REPO / path).exists(), f"the README's layout table names {path}, which is gone"
      assert (REPO / path).is_dir() == path.endswith("/"), path
      assert row_layer == _path_layer(path), (
          f"the README's layout table puts {path} in the layer {row_layer!r}; its folder "
          f"makes it {_path_layer(path)!r}")
      named[path] = row_layer
  # Every file of the package is named, or in a folder that is (a package's
  # __init__.py that holds only its docstring goes with its folder's modules).
  missing = [f for f in _tracked_package_files()
             if not any(f == p or (p.endswith("/") and f.startswith(p)) for p in named)
             and not (f.endswith("/__init__.py") and _only_a_docstring(REPO / f))]
  assert not missing, f"the README's layout table does not name {missing}"


def test_the_layout_table_check_reads_bare_names_in_the_first_paths_folder():
  table = ("| layer | file | job |\n|---|---|---|\n"
           "| core | `minet_jax/core/onednn.py`, `csrc/` | x |\n"
           "| tools | `minet_jax/data/`, `minet_jax/hub.py` | y |\n\nafter\n")
  assert _layout_table(table) == [("core", ["minet_jax/core/onednn.py", "minet_jax/core/csrc/"]),
                                  ("tools", ["minet_jax/data/", "minet_jax/hub.py"])]
  assert [_path_layer(p) for p in ("minet_jax/__init__.py", "minet_jax/core/csrc/",
                                   "minet_jax/train/", "minet_jax/stability/", "configs/")] == [
      "facade", "core", "training", "tools", ""]
