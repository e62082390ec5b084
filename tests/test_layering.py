"""The import rule: core <- tools <- training, no circles, config.py imports only the
fixed-point engine (whose classes name the solvers), which imports nothing.

The graph is read from the source (every ``import``, deferred ones included), so a
function-level import cannot hide an arrow the wrong way.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minet_jax"
# The inference core: what `import minet_jax` and `load`/`apply` may use.
CORE = {"minet_jax", "minet_jax.core.api", "minet_jax.core.checkpoint", "minet_jax.core.config",
        "minet_jax.core.files", "minet_jax.core.fixed_point", "minet_jax.core.layers", "minet_jax.core.model",
        "minet_jax.core.onednn",
        "minet_jax.core.params", "minet_jax.core.strips"}
# Tools the package's public names reach only when called (``minet_jax.pretrained``,
# ``minet_jax.load`` of a .pth): imported inside functions of ``__init__.py``, never by
# ``import minet_jax``.
FACADE_ON_DEMAND = {"minet_jax.hub"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Package modules `name` imports (``from pkg import sub`` counts as an arrow to sub)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "minet_jax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([node.module] if node.module else []))
      if base.split(".")[0] != "minet_jax":
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in known else base)
  return out - {name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_graph_is_read():
  graph = _graph()
  assert "minet_jax.core.params" in graph["minet_jax.core.checkpoint"]
  assert "minet_jax.core.checkpoint" in graph["minet_jax.train.checkpointing"]


def test_config_imports_only_the_fixed_point_engine():
  graph = _graph()
  assert graph["minet_jax.core.config"] == {"minet_jax.core.fixed_point"}
  assert graph["minet_jax.core.fixed_point"] == set()


def test_nothing_outside_train_imports_train():
  wrong = {(a, b) for a, deps in _graph().items() if not a.startswith("minet_jax.train")
           for b in deps if b.startswith("minet_jax.train")}
  assert not wrong


def test_core_imports_only_core():
  graph = _graph()
  wrong = {(a, b) for a in CORE for b in graph[a] if b not in CORE
           and not (a == "minet_jax" and b in FACADE_ON_DEMAND)}
  assert not wrong


def test_the_package_imports_its_on_demand_tools_only_inside_functions():
  tree = ast.parse((PACKAGE / "__init__.py").read_text())
  top_level = {alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
               for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
  top_level |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
  assert not top_level & FACADE_ON_DEMAND
  assert FACADE_ON_DEMAND <= _graph()["minet_jax"]  # Still read, from the function bodies.


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
