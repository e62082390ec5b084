"""minet-jax against the authors' PyTorch code, interleaved in one process.

    python benchmarks/vs_pytorch.py --authors ~/src/MI-Net \\
        --pth ../shared/weights/minet_its_official.pth [--mode inference train] \\
        [--conv-backends xla onednn] [--variants exact precision=default] [--repeats 7]
        [--torch-site-packages DIR]

Needs PyTorch, which is not a dependency of this project: install it anywhere and
either run this with that interpreter (with minet-jax installed there too) or pass
``--torch-site-packages`` (the folder holding ``torch/``), which is appended to
sys.path. ``--authors`` is a checkout of Jiawei-Shen/MI-Net (its ``MINet.py`` is
imported, not copied); ``--pth`` their released checkpoint.

On a shared or noisy machine, timings taken in separate runs minutes apart differ by
30% or more, which is larger than the differences asked about. So each repeat times
every contender once, in turn, in this one process, and the medians and their ratios
are printed together. PyTorch gets ``--threads`` threads (default: all cores, which
XLA:CPU uses too); OpenMP's idle threads are told to sleep (OMP_WAIT_POLICY=PASSIVE)
and every call is preceded by a short pause, so one side's spinning threads do not
slow the other.

inference: one 460x620 image (values 0..255, the released model's input scale):
  the authors' model in eager mode, under ``torch.compile`` (inductor, ``freezing``,
  channels_last: what a PyTorch deployment would use), and ``jax.jit(minet_jax.apply)``
  with the converted weights, once per ``ModelConfig.conv_backend`` given
  (``--conv-backends``, default "xla" and "onednn") and setting (``--variants``:
  "exact", the default, or inexact ``ModelConfig`` changes such as precision=default or
  dtype=bfloat16, which bring in torch.compile under bfloat16 autocast, PyTorch's own
  reduced-precision deployment); outputs compared first.
train: one optimizer step of the released architecture on random batches (2x128x128
  and 8x64x64 by default, ``--shapes``): the authors' ``main.py`` step (their
  ``torch.norm`` loss, Adam at 0.01) and minet-jax's jitted step
  (``configs/its_authors.py``), once per convolution backend and
  ``config.xla_cpu_ynn_fusions`` setting given (``--ynn-fusions``, default: "default").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Before torch starts OpenMP.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import minet_jax  # noqa: E402
from minet_jax import convert, metrics  # noqa: E402
from minet_jax.train import config_file  # noqa: E402
from minet_jax.train import state as state_lib  # noqa: E402
from minet_jax.train.step import make_train_step, parse_ynn_fusions  # noqa: E402

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
_PAUSE_S = 0.2


def _import_torch(site_packages: str | None):
  if site_packages:
    sys.path.append(site_packages)
  try:
    import torch
  except ImportError:
    raise SystemExit("vs_pytorch: PyTorch is not importable; install it (it is not a "
                     "dependency of minet-jax) or pass --torch-site-packages") from None
  return torch


def _authors_model(torch, authors: str, pth: str) -> "torch.nn.Module":
  """The authors' MI_Net with their released weights, from their own MINet.py."""
  if not (pathlib.Path(authors) / "MINet.py").is_file():
    raise SystemExit(f"vs_pytorch: --authors {authors}: no MINet.py there")
  sys.path.insert(0, authors)
  from MINet import MI_Net  # noqa: PLC0415 (the authors' module)
  model = MI_Net()
  state = torch.load(pth, map_location="cpu", weights_only=False)
  # The release pickles {"model": the DataParallel-wrapped module, ...}.
  state = state.get("model", state) if isinstance(state, dict) else state
  state = state if isinstance(state, dict) else state.state_dict()
  model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
  return model


def _interleaved(contenders: dict, repeats: int) -> dict[str, float]:
  """Median seconds per contender; each repeat calls every contender once, in turn."""
  for fn in contenders.values():
    fn()  # Compile / warm up.
  times = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      time.sleep(_PAUSE_S)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _changes(variant: str) -> dict[str, str]:
  """"exact" -> {}; "precision=default,dtype=bfloat16" -> those ModelConfig changes."""
  if variant == "exact":
    return {}
  try:
    return dict(item.split("=", 1) for item in variant.split(","))
  except ValueError:
    raise SystemExit(f"vs_pytorch: --variants takes 'exact' or field=value[,field=value], "
                     f"got {variant!r}") from None


def _psnr(a: np.ndarray, b: np.ndarray) -> str:
  """PSNR of two 1xHxWx3 images in [0, 1], as text (against torch.compile's float32 output)."""
  return (f"{float(metrics.psnr(a, b, data_range=1.0)[0]):.1f} dB PSNR with torch.compile's "
          "float32 output")


def _print(results: dict[str, float], reference: str) -> None:
  for name, seconds in results.items():
    ratio = seconds / results[reference]
    print(f"  {name:44s} {seconds:7.3f} s  ({ratio:.2f}x {reference})", flush=True)


def inference(torch, model, pth: str, backends: list[str], variants: list[str],
              repeats: int) -> None:
  """Prints eager, torch.compile and minet-jax seconds per 460x620 image, interleaved."""
  rng = np.random.default_rng(0)
  rgb = rng.random((1, 460, 620, 3), np.float32)
  bgr255 = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(0, 3, 1, 2)) * 255)
  model = model.eval()
  released = convert.weights_from_checkpoint(pth)
  models = {f"{b}, {v}": released.replace_config(conv_backend=b, **_changes(v))
            for v in variants for b in backends}
  apply = jax.jit(minet_jax.apply)
  image = jnp.asarray(rgb)

  import torch._inductor.config as inductor_config  # noqa: PLC0415
  inductor_config.freezing = True
  # A copy: .to(memory_format=...) converts a module in place, and the eager model
  # (and the training step after this) must keep the authors' NCHW weights.
  compiled = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))
  bgr255_cl = bgr255.to(memory_format=torch.channels_last)
  with torch.no_grad():
    start = time.perf_counter()
    theirs = compiled(bgr255_cl)
    print(f"  torch.compile first call (compilation) {time.perf_counter() - start:.1f} s")
    # minet_jax.apply clips to [0, 1], as the authors clip before saving.
    theirs_rgb = np.clip(theirs.numpy().transpose(0, 2, 3, 1)[..., ::-1] / 255.0, 0.0, 1.0)
    contenders = {"authors' PyTorch, eager": lambda: model(bgr255),
                  "authors' PyTorch, torch.compile": lambda: compiled(bgr255_cl)}
    if any(_changes(v) for v in variants):
      # PyTorch's own reduced-precision deployment, for the bfloat16 variants: the
      # compiled model under CPU autocast (bfloat16 convolutions).
      def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
          return compiled_bf16(bgr255_cl)
      compiled_bf16 = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))
      bf16_rgb = np.clip(autocast().float().numpy().transpose(0, 2, 3, 1)[..., ::-1] / 255.0,
                         0.0, 1.0)
      print(f"  torch.compile + autocast bfloat16: outputs agree to {_psnr(bf16_rgb, theirs_rgb)}")
      contenders["authors' PyTorch, torch.compile, autocast bfloat16"] = autocast
    for variant, params in models.items():
      print(f"  minet-jax {variant}: outputs agree to "
            f"{_psnr(np.asarray(apply(params, image)), theirs_rgb)}")
      contenders[f"minet-jax, jax.jit(minet_jax.apply), {variant}"] = (
          lambda params=params: jax.block_until_ready(apply(params, image)))
    results = _interleaved(contenders, repeats)
  print(f"inference, 460x620, median of {repeats}:")
  _print(results, "authors' PyTorch, torch.compile")


def train(torch, model, shapes: list[tuple[int, int, int]],
          settings: list[tuple[str, str]], repeats: int) -> None:
  """Prints the authors' training step and minet-jax's (per setting) per shape, interleaved."""
  config = config_file.load_module(_CONFIGS / "its_authors.py").get_config()
  model = model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=float(config.optimizer.learning_rate))
  for n, h, w in shapes:
    rng = np.random.default_rng(0)
    hazy, clear = (rng.random((n, h, w, 3), np.float32) for _ in range(2))
    x = torch.from_numpy(np.ascontiguousarray(hazy.transpose(0, 3, 1, 2)) * 255)
    y = torch.from_numpy(np.ascontiguousarray(clear.transpose(0, 3, 1, 2)) * 255)

    def authors_step():
      optimizer.zero_grad()
      torch.norm(model(x) - y).backward()  # Their main.py's loss.
      optimizer.step()

    batch = {"hazy": jnp.asarray(hazy), "clear": jnp.asarray(clear)}
    contenders = {"authors' PyTorch, eager (their main.py step)": authors_step}
    for backend, setting in settings:
      with config.unlocked():
        config.model.conv_backend = backend
      step = make_train_step(config.loss, ynn_fusions=setting)
      holder = {"state": state_lib.create_train_state(config)}

      def ours(step=step, holder=holder):
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

      contenders[f"minet-jax step, {backend}, ynn_fusions={setting}"] = ours
    results = _interleaved(contenders, repeats)
    print(f"training step, {n}x{h}x{w}, median of {repeats}:")
    _print(results, "authors' PyTorch, eager (their main.py step)")


def main() -> None:
  """Parses the command line and prints the requested comparisons."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--authors", required=True, help="folder holding the authors' MINet.py")
  parser.add_argument("--pth", required=True, help="the authors' released checkpoint")
  parser.add_argument("--mode", nargs="+", choices=("inference", "train"),
                      default=["inference", "train"])
  parser.add_argument("--shapes", nargs="+", default=["2x128x128", "8x64x64"],
                      help="training batch shapes N x H x W")
  parser.add_argument("--conv-backends", nargs="+", default=["xla", "onednn"])
  parser.add_argument("--variants", nargs="+", default=["exact"],
                      help="inference settings per convolution backend: 'exact' (the "
                           "checkpoint's) or ModelConfig changes such as precision=default "
                           "or dtype=bfloat16; any of those brings in torch.compile under "
                           "bfloat16 autocast")
  parser.add_argument("--ynn-fusions", nargs="+", default=["default"])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--torch-site-packages", default=None)
  args = parser.parse_args()
  shapes = []
  for text in args.shapes:
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 3:
      raise SystemExit(f"--shapes takes N x H x W, got {text!r}")
    shapes.append(shape)
  for setting in args.ynn_fusions:
    try:
      parse_ynn_fusions(setting)
    except ValueError as e:
      raise SystemExit(f"vs_pytorch: --ynn-fusions: {e}") from None
  fusions = args.ynn_fusions if jax.default_backend() == "cpu" else ["default"]
  settings = [(b, f) for b in args.conv_backends for f in fusions]
  torch = _import_torch(args.torch_site_packages)
  torch.set_num_threads(args.threads)
  model = _authors_model(torch, args.authors, args.pth)
  print(f"torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} "
        f"({jax.default_backend()}), {os.cpu_count()} cores ({platform.machine()})")
  if "inference" in args.mode:
    for variant in args.variants:
      try:  # A bad field or value fails now, not after PyTorch has compiled.
        dataclasses.replace(minet_jax.ModelConfig(), **_changes(variant))
      except (TypeError, ValueError) as e:
        raise SystemExit(f"vs_pytorch: --variants {variant}: {e}") from None
    inference(torch, model, args.pth, args.conv_backends, args.variants, args.repeats)
  if "train" in args.mode:
    train(torch, model, shapes, settings, args.repeats)


if __name__ == "__main__":
  main()
