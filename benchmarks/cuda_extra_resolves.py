"""Checks that the `cuda` extra resolves to the CUDA plugin of the jax it installs.

    python benchmarks/cuda_extra_resolves.py [--no-constraints]

Asks pip what ``pip install -c constraints.txt ".[cuda]"`` would install
(``--dry-run --report``: package metadata only, no 3 GB of wheels, but a few minutes
of index queries, which is why this is a script and not a test) and fails unless it
holds a ``jax-cudaNN-plugin`` of exactly the resolved jax's version. ``--no-constraints``
resolves the ranges of pyproject.toml alone (the newest releases this Python can have).
Needs the package index; prints the jax, jaxlib and CUDA packages it would install.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve(constraints: bool) -> dict[str, str]:
  """Name -> version of everything pip would install for the checkout's `cuda` extra."""
  with tempfile.TemporaryDirectory() as tmp:
    report = pathlib.Path(tmp) / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
               "--ignore-installed", "--report", str(report)]
    if constraints:
      command += ["-c", str(ROOT / "constraints.txt")]
    done = subprocess.run(command + [f"{ROOT}[cuda]"], capture_output=True, text=True)
    if done.returncode != 0:
      sys.exit(f"pip could not resolve the cuda extra:\n{done.stderr[-4000:]}")
    items = json.loads(report.read_text())["install"]
  return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--no-constraints", action="store_true",
                      help="resolve pyproject.toml's ranges without constraints.txt")
  args = parser.parse_args()
  resolved = resolve(constraints=not args.no_constraints)
  for name in sorted(resolved):
    if name.startswith(("jax", "nvidia-cuda-runtime")):
      print(f"{name}=={resolved[name]}")
  plugins = {name: version for name, version in resolved.items()
             if re.fullmatch(r"jax-cuda\d+-plugin", name)}
  if not plugins or any(v != resolved.get("jax") for v in plugins.values()):
    sys.exit(f"the cuda extra resolves to plugins {plugins} for jax {resolved.get('jax')}")
  print(f"OK: {', '.join(plugins)} {resolved['jax']} for jax {resolved['jax']}")


if __name__ == "__main__":
  main()
