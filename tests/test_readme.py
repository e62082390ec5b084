"""The README's examples run as written: its Python blocks are executed, and the options
its first section names exist."""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import numpy as np
from PIL import Image

from minet_jax import dehaze, image_io

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_blocks_run_as_written(shared_dir, tmp_path, monkeypatch, released_params):
  """Each block runs in a fresh namespace in a folder holding ``photo.jpg`` (a SOTS crop);
  the weights cache is seeded with the shared copy of the release, so nothing is
  downloaded."""
  blocks = _blocks("python")
  assert blocks
  weights = tmp_path / "cache" / "weights"
  weights.mkdir(parents=True)
  shutil.copy(shared_dir / "weights" / "minet_its_official.pth", weights / "model_ITS.pth")
  monkeypatch.setenv("MINET_JAX_CACHE", str(tmp_path / "cache"))
  hazy = np.asarray(Image.open(shared_dir / "data/RESIDE/SOTS/indoor/hazy/1400_1.png"))
  work = tmp_path / "work"
  work.mkdir()
  Image.fromarray(hazy[100:196, 200:328]).save(work / "photo.jpg", quality=95)
  monkeypatch.chdir(work)
  for block in blocks:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
  written = image_io.read_rgb(work / "photo_dehazed.png")
  import minet_jax
  want = minet_jax.apply(released_params, image_io.read_rgb(work / "photo.jpg"))
  np.testing.assert_array_equal(written, np.round(np.asarray(want) * 255) / 255)


def test_the_dehaze_options_the_readme_names_exist():
  section = README.read_text().split("## Dehaze a photo", 1)[1].split("\n## ", 1)[0]
  section = re.sub(r"`[^`]*evaluate\.py[^`]*`", "", section)  # another tool's options
  named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", section))
  assert {"--compare", "--format", "--overwrite", "--keep-gray", "--ckpt"} <= named
  known = {o for a in dehaze.parser()._actions for o in a.option_strings}
  assert named <= known, named - known


def test_first_commands_are_the_ones_documented():
  first = _blocks("bash")[0].splitlines()
  assert first[0].startswith("python3 -m venv .venv")
  assert "pip install -r requirements.txt" in first[0]
  assert first[1].startswith("minet-dehaze photo.jpg -o dehazed/")
  assert os.path.isfile(README.parent / "requirements.txt")
