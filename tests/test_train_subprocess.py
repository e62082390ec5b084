"""Training in subprocesses: SIGTERM saves and stops, SIGKILL resumes, 2 devices == 1."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import checkout_env

# Each test trains in several fresh processes (start-up, compile, checkpoints): minutes.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  """Environment of the child runs: a shared compilation cache and TFDS folder."""
  env = checkout_env()
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["MINET_TEST_TFDS"] = str(tmp_path_factory.mktemp("tfds"))
  return env


def train_cmd(env: dict, workdir: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.data_dir={env['MINET_TEST_TFDS']}", "--config.eval_every=0",
          *overrides]


def metrics(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f"training exited early ({process.returncode}):\n"
                           f"{process.stderr.read() if process.stderr else ''}")
    if time.time() > deadline:
      process.kill()
      raise AssertionError("timed out waiting for the training run")
    time.sleep(0.2)


def signal_after(process: subprocess.Popen, workdir: pathlib.Path, step: int,
                 signum: int) -> str:
  """Sends ``signum`` once the run has logged training ``step``; its stderr once it ends."""
  wait_for(lambda: any(r.get("step", 0) >= step and r.get("split") == "train"
                       for r in metrics(workdir)), process)
  process.send_signal(signum)
  return process.communicate(timeout=120)[1]


def test_second_trainer_refused_sigkill_resumes_sigterm_saves(env, tmp_path):
  workdir = tmp_path / "run"

  def start(*overrides):
    return subprocess.Popen(train_cmd(env, workdir, "--config.num_train_steps=100000",
                                      "--config.log_every=1", *overrides),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

  # 1. SIGKILL once a periodic checkpoint (every 2 steps) past step 2 exists: no chance to save.
  first = start("--config.checkpoint_every=2")
  try:
    wait_for(lambda: checkpoint_steps(workdir) and max(checkpoint_steps(workdir)) >= 4, first)
    # Meanwhile a second trainer on the same workdir is refused in one line naming the
    # first's pid and writes nothing; the first carries on undisturbed.
    concurrent = subprocess.run(train_cmd(env, workdir), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    assert concurrent.returncode != 0
    lines = concurrent.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0], concurrent.stderr[-2000:]
    assert [r["event"] for r in metrics(workdir) if "event" in r] == ["start"]
    reached = max(checkpoint_steps(workdir))
    wait_for(lambda: max(checkpoint_steps(workdir)) > reached, first)
  finally:
    first.kill()
  first.communicate(timeout=60)
  killed_at = max(checkpoint_steps(workdir))

  # 2. The rerun resumes from the newest checkpoint; SIGTERM then saves the current
  # step (not a multiple of checkpoint_every) and exits with 143.
  second = start("--config.checkpoint_every=1000")
  stderr = signal_after(second, workdir, killed_at + 3, signal.SIGTERM)
  assert second.returncode == 143, stderr[-4000:]
  records = metrics(workdir)
  resumes = [r for r in records if r.get("event") == "resume"]
  assert len(resumes) == 1 and resumes[0]["from_step"] == killed_at
  # Training restarted at killed_at + 1 (steps after the last checkpoint are redone).
  after_resume = records[records.index(resumes[0]) + 1:]
  first_step = next(r["step"] for r in after_resume if r.get("split") == "train")
  assert first_step == killed_at + 1
  stopped = [r for r in records if r.get("event") == "stopped"]
  assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
  saved = stopped[0]["step"]
  assert saved >= killed_at + 3 and max(checkpoint_steps(workdir)) == saved

  # 3. Ctrl-C (SIGINT) does the same, with 130 and no traceback.
  third = start("--config.checkpoint_every=1000")
  stderr = signal_after(third, workdir, saved + 2, signal.SIGINT)
  assert third.returncode == 130, stderr[-4000:]
  assert "Traceback" not in stderr and "Ctrl-C: saving after this step" in stderr
  stopped = [r for r in metrics(workdir) if r.get("event") == "stopped"]
  assert [r["signal"] for r in stopped] == ["SIGTERM", "SIGINT"]
  assert max(checkpoint_steps(workdir)) == stopped[-1]["step"] >= saved + 2


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from configs import tiny
    from minet_jax.train import sharding, state as state_lib, step as step_lib
    assert jax.device_count() == 2, jax.devices()
    config = tiny.get_config()
    config.data.batch_size = 4
    rng = np.random.default_rng(0)
    batches = [{"hazy": rng.random((4, 32, 32, 3), np.float32),
                "clear": rng.random((4, 32, 32, 3), np.float32)} for _ in range(3)]
    results = {}
    for n in (1, 2):
      mesh = sharding.make_mesh(jax.devices()[:n])
      state = sharding.replicate(state_lib.create_train_state(config), mesh)
      # The loop's own step (same schedule and shapes): its 2-device compile is reused below.
      step = step_lib.make_train_step("mse", state_lib.learning_rate_schedule(config.optimizer),
                                      sharding.replicated(mesh), sharding.batch_sharded(mesh))
      losses = []
      for b in batches:
        state, m = step(state, sharding.global_batch(b, mesh))
        losses.append(float(m["loss"]))
      assert len(jax.tree.leaves(state.state)[0].sharding.device_set) == n
      results[n] = {"losses": losses, "grad_norm": float(m["grad_norm"])}
    # The whole loop on 2 devices, validation batches padded to the device count.
    from minet_jax.train import train_and_evaluate
    config.num_train_steps = 2
    config.data.data_dir = sys.argv[2]
    config.data.num_eval_images = 1
    summary = train_and_evaluate(config, sys.argv[1])
    print(json.dumps({"results": results, "summary": summary}))
""")


def test_two_devices_match_one(env, tmp_path):
  child_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(tmp_path / "w"),
                           env["MINET_TEST_TFDS"]], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  one, two = out["results"]["1"], out["results"]["2"]
  # Losses after two updates agree too, so the updates did. (Parameters themselves are
  # not compared: biases feeding an instance norm have zero true gradient, and Adam
  # turns the reduction-order noise of their gradients into full-size steps.)
  assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
  assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
  assert out["summary"]["step"] == 2 and out["summary"]["num_images"] == 1
  start = next(r for r in metrics(tmp_path / "w") if r.get("event") == "start")
  assert start["devices"] == 2


def test_ctrl_c_at_the_terminal_saves_with_data_workers(env, tmp_path):
  """A terminal's Ctrl-C reaches the whole process group: the data's worker processes
  died of it (a traceback each) and the run blamed its data instead of saving."""
  import os
  workdir = tmp_path / "run"
  run = subprocess.Popen(train_cmd(env, workdir, "--config.num_train_steps=100000",
                                   "--config.log_every=1", "--config.checkpoint_every=1000",
                                   "--config.data.worker_count=2"),
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # Its own group, as a terminal's.
  try:
    wait_for(lambda: any(r.get("step", 0) >= 3 and r.get("split") == "train"
                         for r in metrics(workdir)), run)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
  finally:
    if run.poll() is None:
      os.killpg(run.pid, signal.SIGKILL)
  assert run.returncode == 130, stderr[-4000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-4000:]
  stopped = [r for r in metrics(workdir) if r.get("event") == "stopped"]
  assert len(stopped) == 1 and checkpoint_steps(workdir)[-1] == stopped[0]["step"] >= 3
