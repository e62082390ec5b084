"""Two processes on JAX's multi-controller runtime train exactly like one.

`train.py` runs configs/tiny.py (a global batch of two 32 px crops) as one plain
process and as a 2-process `jax.distributed` job on localhost (CPU, gloo
collectives, one device per process); losses and weights must agree, and each
layout must resume the other's checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import checkout_env

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300.0

# The layouts differ only in rounding: one device runs the step on both crops, two
# devices each run it on one crop (a program for a smaller batch) and an all-reduce adds
# the halves. That moves a loss or gradient by a few float32 ulps; measured, the losses
# differ by <= 5e-7 relative and the weights after three Adam steps by <= 2.5e-6 of each
# tensor's largest magnitude, while another crop, a skipped step or an update from half
# the batch moves them by 1e-4 or more.
LOSS_RTOL = 2e-6
WEIGHT_ATOL = 1e-5  # Times the tensor's largest magnitude.
# Biases that feed an instance norm (model.py: deconv3 -> norm4, deconv2 -> norm5): the
# norm removes them, so their true gradient is zero and each run holds float noise of
# random sign there, which Adam turns into steps of the full learning rate. They do not
# change the model's output, which the losses compare.
NORMALISED_BIASES = ("deconv2/bias", "deconv3/bias")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  """Environment of the child runs: CPU with gloo, a shared compilation cache and TFDS folder."""
  env = checkout_env({k: v for k, v in os.environ.items()
                      if not k.startswith(("SLURM_", "OMPI_"))})
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["MINET_TEST_TFDS"] = str(tmp_path_factory.mktemp("tfds"))
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(env: dict, workdir: pathlib.Path, processes: int, *overrides: str,
          slurm: bool = False, data_dir: pathlib.Path | None = None,
          ) -> list[subprocess.Popen]:
  """`train.py` as one plain process, or as `processes` processes of one job.

  The job's processes learn the cluster from --coordinator_address / --num_processes /
  --process_id, or (``slurm``) from the variables SLURM sets for each task, as
  `jax.distributed.initialize()` reads them.
  """
  data_dir = data_dir or env["MINET_TEST_TFDS"]
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         f"--config.data.data_dir={data_dir}", *overrides]
  if processes == 1:
    return [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  port = free_port()
  runs = []
  for i in range(processes):
    if slurm:
      child_env = dict(env, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
                       SLURM_NTASKS=str(processes), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                       JAX_COORDINATOR_PORT=str(port))
      args = ["--config.distributed=True"]
    else:
      child_env = env
      args = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
              f"--process_id={i}"]
    runs.append(subprocess.Popen(cmd + args, cwd=REPO, env=child_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True))
  return runs


def finish(runs: list[subprocess.Popen], returncode: int = 0) -> None:
  """Waits for every process of a run; kills them all if one fails or hangs."""
  deadline = time.time() + TIMEOUT
  try:
    for run in runs:
      _, stderr = run.communicate(timeout=max(deadline - time.time(), 1.0))
      assert run.returncode == returncode, f"exit {run.returncode}:\n{stderr[-4000:]}"
  finally:
    for run in runs:
      if run.poll() is None:
        run.kill()
        run.communicate()


def records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
  """Training loss by step; a step logged twice is an error (only process 0 writes)."""
  steps = [r["step"] for r in records if r.get("split") == "train"]
  assert len(steps) == len(set(steps)), steps
  return {r["step"]: r["loss"] for r in records if r.get("split") == "train"}


def after_resume(workdir: pathlib.Path) -> list[dict]:
  lines = records(workdir)
  last = max(i for i, r in enumerate(lines) if r.get("event") == "resume")
  return lines[last:]


def weights(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """The weights of checkpoint `step`, flattened to "layer/.../name" keys."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(workdir / "checkpoints" / str(step) / "params")
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}{k}/")
    else:
      flat[prefix[:-1]] = np.asarray(node)

  walk(tree, "")
  return flat


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert got.keys() == want.keys()
  for key in want:
    if key not in NORMALISED_BIASES:
      np.testing.assert_allclose(got[key], want[key], rtol=0,
                                 atol=WEIGHT_ATOL * np.max(np.abs(want[key])), err_msg=key)


def folder_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def wait_for(path: pathlib.Path, runs: list[subprocess.Popen]) -> None:
  """Waits until `path` exists; kills the run if one of its processes exits first."""
  deadline = time.time() + TIMEOUT
  while not path.exists():
    if any(run.poll() is not None for run in runs) or time.time() > deadline:
      for run in runs:
        if run.poll() is None:
          run.kill()
      stderr = [run.communicate()[1][-3000:] for run in runs]
      raise AssertionError(f"no {path}; exit statuses {[r.returncode for r in runs]}:\n"
                           + "\n".join(stderr))
    time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(env, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  # The reference: one process, 4 steps, a checkpoint after each (the last 3 kept).
  reference = start(env, one, 1, "--config.checkpoint_every=1")
  # At the same time two processes, the same global batch of 2 crops (1 per process),
  # 3 steps, building the dataset in a folder of their own (process 0 builds it while
  # process 1 waits: two builds at once would collide).
  job = start(env, two, 2, "--config.num_train_steps=3", "--config.checkpoint_every=1",
              data_dir=tmp_path / "tfds")
  finish(reference)
  finish(job)

  want = losses(records(one))
  assert list(want) == [1, 2, 3, 4]
  got = losses(records(two))
  assert list(got) == [1, 2, 3]
  for step in got:
    assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), step
  assert_same_weights(weights(two, 3), weights(one, 3))
  # Validation (after step 2, on every process; written by process 0) agrees too.
  evals = [[r for r in records(w) if r.get("split") == "eval" and r["step"] == 2][0]
           for w in (one, two)]
  assert evals[1]["psnr"] == pytest.approx(evals[0]["psnr"], rel=1e-6)
  start_event = [r for r in records(two) if r.get("event") == "start"]
  assert len(start_event) == 1 and start_event[0]["processes"] == 2
  # Checkpoints are written once, not once per process: the same steps, and no second
  # copy of the arrays (one more copy would add about half again to the folder).
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["1", "2", "3"]
  assert folder_bytes(two / "checkpoints" / "3") < 1.3 * folder_bytes(one / "checkpoints" / "3")

  # Each layout resumes the other's step-3 checkpoint and must reach the reference's
  # step 4: same batch (the data position), same update (the Adam moments).
  one_to_two, two_to_one = tmp_path / "one_to_two", tmp_path / "two_to_one"
  shutil.copytree(one, one_to_two)
  for sub in ("checkpoints", "best"):  # Back to the workdir as it was after step 3.
    for step_dir in (one_to_two / sub).iterdir():
      if int(step_dir.name) > 3:
        shutil.rmtree(step_dir)
  shutil.copytree(two, two_to_one)
  to_one = start(env, two_to_one, 1, "--config.num_train_steps=4")
  # The 2-process job runs on until SIGTERM reaches one of its processes only: both must
  # stop after the same step, save it and exit with 143 (saving is collective).
  to_two = start(env, one_to_two, 2, "--config.num_train_steps=1000",
                 "--config.checkpoint_every=1", "--config.keep_checkpoints=1000", slurm=True)
  wait_for(one_to_two / "checkpoints" / "5", to_two)
  to_two[1].send_signal(signal.SIGTERM)
  finish(to_one)
  finish(to_two, returncode=143)

  for workdir in (two_to_one, one_to_two):
    resumed = after_resume(workdir)
    assert resumed[0]["from_step"] == 3
    assert losses(resumed)[4] == pytest.approx(want[4], rel=LOSS_RTOL)
    assert_same_weights(weights(workdir, 4), weights(one, 4))
  stopped = [r for r in after_resume(one_to_two) if r.get("event") == "stopped"]
  assert len(stopped) == 1
  saved = max(int(p.name) for p in (one_to_two / "checkpoints").iterdir())
  assert stopped[0]["step"] == saved >= 5


def test_bad_process_settings_are_one_line_errors(monkeypatch):
  from minet_jax.train import sharding

  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
    sharding.maybe_initialize_distributed(True)
  with pytest.raises(ValueError, match=r"process id must be in \[0, 2\), got 2"):
    sharding.maybe_initialize_distributed(True, "localhost:1", 2, 2)
  sharding.maybe_initialize_distributed(False)  # Not asked: reads nothing.
