"""Where a block-wise distilled stable MI-Net loses PSNR: each block's copy of the teacher's.

    python benchmarks/stable_attribution.py --stable WORKDIR [--shared ../shared]
        [--sets sots its synthetic] [--synthetic-images 6] [--out FILE.json] [--note TEXT]

The student (``--stable``: a training workdir or checkpoint, solved as it stores) and
the teacher (the authors' released model, 8 unrolled steps) run on the same images. Per
image, with g0_i and y_i the teacher's input and output of block i:

* ``student`` / ``teacher``: PSNR to the ground truth; ``student_vs_teacher``: PSNR of
  the student's output to the teacher's (both clipped to [0, 1]);
* ``residual_i``: the one-step relative residual ||T_i(k) - k|| / ||k - g0_i|| of the
  student's solved map T_i(g) = g0_i + s eta f_i(g) at the stage k that would answer
  y_i, the square root of the training's matching term (`contractive.fixed_point_mismatch`);
* ``answer_error_i``: ||Y_i(g0_i) - y_i|| / ||y_i - g0_i||, Y_i the student's block i
  (its solve and answer) from the teacher's input: the error the residual stands for;
* ``local_i``: PSNR to the teacher's output when block i alone is the student's (from
  the teacher's input; every other block output, and the layers after the blocks, the
  teacher's): the cost of one block's error without its effect on later blocks;
* ``prefix_i``: PSNR to the teacher's output with the student's blocks 1..i followed by
  the teacher's, from the teacher's encoder output and through the teacher's layers after
  the blocks: the cost of the first i blocks' errors, carried through the rest
  (``prefix_n``, every block the student's, differs from ``student_vs_teacher`` only
  where the student's other layers differ from the teacher's; block-wise training
  leaves them as they are).

Sets: ``sots`` (the SOTS indoor samples of ``--shared``, the test set: measured here,
never trained on), ``its`` (the RESIDE ITS samples of ``--shared``) and ``synthetic``
(the first ``--synthetic-images`` hazy images of the train split of the student's own
synthetic data, as its training config made it: with ``hazes_per_scene`` 2, the default
6 are three scenes' two hazes each): on images the student trained on, a domain gap
cannot explain what it misses. PSNR here is the plain one on [0, 1] (no border crop);
on SOTS it agrees with `minet_jax.metrics.dehazing_scores` to about 1e-5 dB.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from minet_jax import convert, metrics
from minet_jax.core import checkpoint
from minet_jax.core.params import Params, model_from_params
from minet_jax.data import folders, synthetic
from minet_jax.train import inputs
from minet_jax.stability import contractive

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR of two RGB images on the [0, 1] scale, both clipped to it first."""
  return float(metrics.psnr(np.clip(a, 0, 1), np.clip(b, 0, 1), data_range=1.0))


Pair = tuple[str, np.ndarray, np.ndarray]  # (key, hazy, ground truth), uint8 HxWx3


def synthetic_set(workdir: pathlib.Path) -> synthetic.SyntheticHazeConfig:
  """The synthetic set the training run at ``workdir`` trained on (its config.json), read
  the way training reads it.

  Raises:
    ValueError: the run trained on another dataset or on part of the train split, whose
      first images need not be ones it saw.
  """
  data = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())["data"])
  if data.name != "synthetic_haze" or data.train_split != "train":
    raise ValueError(f"{workdir} trained on {data.name} split {data.train_split!r}, not on "
                     "the whole synthetic train split")
  return inputs.synthetic_config(data)


def synthetic_pairs(cfg: synthetic.SyntheticHazeConfig, count: int) -> list[Pair]:
  """The first ``count`` pairs of the train split of ``cfg``."""
  return [(e["key"], e["hazy"], e["clear"])
          for e in itertools.islice(synthetic.generate("train", cfg), count)]


class Attribution:
  """Jitted pieces of the teacher and the student, shared by every image of a size."""

  def __init__(self, teacher: Params, student: Params):
    """Splits both models and compiles nothing yet; ``ValueError`` if their block counts
    differ."""
    if teacher.config.num_blocks != student.config.num_blocks:
      raise ValueError("the teacher and the student have different numbers of IM-blocks")
    self.num_blocks = teacher.config.num_blocks
    self.t_def, self.t_state = nnx.split(model_from_params(teacher))
    self.s_def, self.s_state = nnx.split(model_from_params(student))
    t_def, s_def = self.t_def, self.s_def

    @jax.jit
    def teacher_blocks(t_state, x):
      model = nnx.merge(t_def, t_state)
      image = model.model_input(x)
      runs = model.solve_blocks(image)
      return image, [r.g0 for r in runs], [r.output for r in runs]

    def block_fn(graphdef: nnx.GraphDef):
      # The block index is static: each block is its own compiled solve.
      @functools.partial(jax.jit, static_argnums=1)
      def run(state, i, g0):
        return nnx.merge(graphdef, state).im_blocks[i](g0)
      return run

    @functools.partial(jax.jit, static_argnums=1)
    def residual(s_state, i, g0, y):
      block = nnx.merge(s_def, s_state).im_blocks[i]
      return jnp.sqrt(contractive.fixed_point_mismatch(block, g0, y))[0]

    @functools.partial(jax.jit, static_argnums=3)
    def decode(t_state, states, image, size):
      return nnx.merge(t_def, t_state).output_from_states(list(states), image, size)

    @jax.jit
    def student_forward(s_state, x):
      return nnx.merge(s_def, s_state)(x)

    self.teacher_blocks, self.residual = teacher_blocks, residual
    self.t_block, self.s_block = block_fn(t_def), block_fn(s_def)
    self._decode, self.student_forward = decode, student_forward

  def decode(self, states: list[jax.Array], image: jax.Array, size: tuple[int, int]
             ) -> np.ndarray:
    """The teacher's layers after the blocks on ``states``: RGB [0, 1]-scale HxWx3."""
    return np.asarray(self._decode(self.t_state, tuple(states), image, tuple(size)))[0]

  def image(self, hazy: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Every figure of the module docstring for one pair (uint8 HxWx3 each)."""
    x = jnp.asarray(hazy[None], jnp.float32) / 255.0
    gt = gt.astype(np.float32) / 255.0
    size = hazy.shape[:2]
    image, g0s, ys = self.teacher_blocks(self.t_state, x)
    teacher_out = self.decode(ys, image, size)
    row = {"teacher": psnr(teacher_out, gt)}
    student_out = np.asarray(self.student_forward(self.s_state, x))[0]
    row["student"] = psnr(student_out, gt)
    row["student_vs_teacher"] = psnr(student_out, teacher_out)
    answers = []  # the student's block i from the teacher's input
    for i in range(self.num_blocks):
      y = self.s_block(self.s_state, i, g0s[i])
      answers.append(y)
      row[f"residual_{i + 1}"] = float(self.residual(self.s_state, i, g0s[i], ys[i]))
      row[f"answer_error_{i + 1}"] = float(jnp.linalg.norm(y - ys[i])
                                           / jnp.linalg.norm(ys[i] - g0s[i]))
      local = list(ys)
      local[i] = y
      row[f"local_{i + 1}"] = psnr(self.decode(local, image, size), teacher_out)
    g0 = answers[0]  # from the teacher's encoder output: only blocks differ along the chain
    prefix_states = []
    for i in range(self.num_blocks):
      if i:
        g0 = self.s_block(self.s_state, i, g0)
      prefix_states.append(g0)
      states, g = list(prefix_states), g0
      for j in range(i + 1, self.num_blocks):
        g = self.t_block(self.t_state, j, g)
        states.append(g)
      row[f"prefix_{i + 1}"] = psnr(self.decode(states, image, size), teacher_out)
    return row


def main() -> int:
  """Measures every set, writes ``--out`` after each, and prints the means as a table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stable", type=pathlib.Path, required=True,
                      help="the student: a training workdir or a checkpoint folder")
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--sets", nargs="+", default=["sots", "its", "synthetic"],
                      choices=["sots", "its", "synthetic"])
  parser.add_argument("--synthetic-images", type=int, default=6)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--note", default="", help="a label stored with the figures")
  args = parser.parse_args()
  if args.synthetic_images < 1:
    parser.error("--synthetic-images must be >= 1")
  synthetic_cfg = None
  if "synthetic" in args.sets:
    if not (args.stable / "config.json").is_file():
      parser.error("--sets synthetic needs --stable to be a training workdir (its config.json "
                   "says which synthetic set it trained on)")
    try:
      synthetic_cfg = synthetic_set(args.stable)
    except ValueError as e:
      parser.error(f"--sets synthetic: {e}")

  student, params_dir = checkpoint.load_with_source(args.stable)
  teacher = convert.weights_from_checkpoint(args.shared / "weights" / "minet_its_official.pth")
  attribution = Attribution(teacher, student)
  sources = {
      "sots": lambda: [(r.key, *folders.load_pair(r)) for r in folders.find_sots_pairs(
          args.shared / "data/RESIDE/SOTS/indoor")],
      "its": lambda: [(r.key, *folders.load_pair(r)) for r in folders.find_its_pairs(
          args.shared / "data/RESIDE/ITS")],
      "synthetic": lambda: synthetic_pairs(synthetic_cfg, args.synthetic_images),
  }
  report = {"stable": str(args.stable), "note": args.note,
            # A workdir loads its kept checkpoint: say which step that was.
            "checkpoint_step": None if params_dir is None else int(params_dir.parent.name),
            "backend": jax.default_backend(), "devices": str(jax.devices()[0]), "sets": {}}
  for name in args.sets:
    rows = []
    for key, hazy, gt in sources[name]():
      rows.append({"image": key, **attribution.image(hazy, gt)})
      print(f"{name} {key}: " + " ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                          if k != "image"), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    report["sets"][name] = {"rows": rows, "mean": mean}
    if args.out:
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(report, indent=1) + "\n")

  keys = list(next(iter(report["sets"].values()))["mean"])
  print("\n| set | images | " + " | ".join(keys) + " |")
  print("|---|---|" + "---|" * len(keys))
  for name, entry in report["sets"].items():
    print(f"| {name} | {len(entry['rows'])} | "
          + " | ".join(f"{entry['mean'][k]:.3f}" for k in keys) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
