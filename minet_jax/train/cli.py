"""Trains MI-Net.

    python train.py --config configs/quickstart.py --workdir workdirs/quickstart
    python train.py --config configs/its.py --workdir workdirs/its \\
        --config.data.manual_dir ~/data/RESIDE

``minet-train`` (the installed console script) takes the same flags; the --config
path is relative to the current folder either way. Rerunning with the same --workdir
resumes from its latest checkpoint. Any config field can be overridden with
--config.<field>=<value>; unknown fields are an error.

One process of a multi-process job (docs/TRAINING.md, "Several devices and hosts"):

    python train.py --config configs/its.py --workdir /shared/its \\
        --coordinator_address host0:12345 --num_processes 2 --process_id 0
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (e.g. configs/quickstart.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process job (default: "
    "JAX_COORDINATOR_ADDRESS, else detected); giving any of these three flags joins the job.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (default: JAX_NUM_PROCESSES, else detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default: JAX_PROCESS_ID, "
    "else detected).")
flags.mark_flags_as_required(["config", "workdir"])

_HELP_FLAGS = ("--help", "-?", "--helpshort", "-h")
USAGE_EXIT = 2  # A command line refused before anything loads, as argparse exits.


def usage_error(message: str) -> NoReturn:
  """Refuses the command line: "train: error: <message>" on stderr, exit status 2.

  Errors found once training has begun to load (config values, data, checkpoints, the
  run itself) exit 1, and a run stopped by signal n exits 128 + n (resumable)."""
  print(f"train: error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT)


def _config_file(argv: list[str]) -> str | None:
  """The --config file named on the command line (config_flags allows "file.py:argument")."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def usage(program: str) -> str:
  """The --help text: a usage line, this module's docstring, and the flags defined here."""
  flag_lines = flags.FLAGS.module_help(__name__).strip("\n").splitlines()[1:]  # no header
  return "\n".join([f"usage: {program} --config FILE --workdir DIR [--config.FIELD=VALUE ...]",
                    "", __doc__.strip(), "", "flags:", *flag_lines, "",
                    "Try --helpfull to get a list of all flags."])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one-line errors for a missing config file or an unknown
  --config.<field>, and a --help that exits 0."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    # absl's own --help lists the flags of __main__ (train.py or the console script,
    # which define none) and exits 1.
    print(usage(os.path.basename(argv[0])))
    sys.exit(0)
  path = _config_file(argv)
  if path and not os.path.isfile(path):
    usage_error(f"--config {path}: no such file")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(f"{_flag_error(e)} (see --help)")
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config lacks.
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    message = str(e.args[0] if e.args else e)
    message = message.replace("\\n", " ").replace("\n", " ").replace("\\'", "").replace("'", "")
    if not overrides:  # Then the config file's own code raised it.
      usage_error(f"could not load --config: its code failed: {type(e).__name__}: "
                  f"{message.strip(chr(34))}")
    usage_error(f"unknown config field {message} (overrides given: {' '.join(overrides)}); "
                "see the config file for the fields that exist")
  except Exception as e:  # The config file is missing, or its own code failed.
    usage_error(f"could not load --config: {_last_line(e)}")


def _flag_error(e: flags.Error) -> str:
  """absl's parse error as one line: "--workdir is required", "--config.x=abc: invalid ...",
  and for a config file whose code failed, its error without the traceback."""
  if "Traceback (most recent call last)" in str(e):
    flag = str(e).split(": Error whilst parsing config file", 1)[0].removeprefix("flag ")
    return f"{' '.join(flag.split())}: the config file failed: {_last_line(e)}"
  message = " ".join(str(e).split())
  missing = re.fullmatch(r"flag --(\S+)=None: Flag --\S+ must have a value other than None\.?",
                         message)
  if missing:
    return f"--{missing[1]} is required"
  return message.removeprefix("flag ")


def _last_line(e: Exception) -> str:
  """config_flags nests the cause (e.g. "[Errno 2] No such file") on the last line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if len(lines) > 1 else f"{type(e).__name__}: {e}"


def _loaded_config():
  """The config, or a one-line exit when its file could not be read."""
  config = _CONFIG.value
  try:
    config.get("model")  # config_flags reports a file it could not read only on first use.
  except OSError as e:
    usage_error(f"could not load --config: {_last_line(e)}")
  return config


# What orbax 0.12 logs of a failed asynchronous save before raising it again.
_RERAISED_BY_ORBAX = ("Handler Commit operations or the Commit callback",
                      "_SignalingThread.run() raised", "Save Finalize thread")


def main(argv: list[str]) -> None:
  """Trains with the parsed flags; prints the run's summary as JSON."""
  if len(argv) > 1:
    usage_error(f"unexpected arguments: {' '.join(argv[1:])} (see --help)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; -v 0 shows it.
    # orbax logs a failed background save with its traceback, then raises the same error
    # in the training thread, which reports it in one line (-v 0 shows both). Only those
    # records go: orbax's other errors are not raised again.
    logging.get_absl_handler().addFilter(
        lambda record: not any(m in record.getMessage() for m in _RERAISED_BY_ORBAX))
  # Deferred: the dataset and checkpoint code load only once the flags parse.
  from minet_jax import CheckpointError
  from minet_jax.core import checkpoint
  from minet_jax.data import DatasetLayoutError
  from minet_jax.train import (ConfigError, DiskFullError, NonFiniteLossError, sharding,
                               train_and_evaluate)
  workdir = _WORKDIR.value
  if not workdir.strip():  # absl takes --workdir= (an unset variable): it would mean cwd.
    usage_error("--workdir is empty; name a folder (it is created when it does not exist)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    usage_error(f"--workdir {workdir} is a file; name a folder (it is created when it does "
                "not exist)")
  launch = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    # Before anything else touches JAX; --config.distributed=True alone joins via the
    # environment inside train_and_evaluate.
    sharding.maybe_initialize_distributed(any(v is not None for v in launch), *launch)
  except ValueError as e:
    usage_error(str(e))  # A bad --coordinator_address, --num_processes or --process_id.
  try:
    summary = train_and_evaluate(_loaded_config(), workdir)
  except (ConfigError, DatasetLayoutError, CheckpointError, NonFiniteLossError) as e:
    sys.exit(f"train: error: {e}")  # Errors that explain themselves; no traceback.
  except DiskFullError as e:
    sys.exit(f"train: error: {e.strerror}")
  except OSError as e:  # Another write the system refused (a file size limit, ...).
    sys.exit(f"train: error: {checkpoint.one_line_error(e)}; once that is mended, a rerun "
             "resumes from the last checkpoint")
  except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one: no save.
    print("train: interrupted; a rerun resumes from the last checkpoint", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  print(json.dumps(summary, indent=2))
  if summary.get("stopped_by"):
    # 128 + the signal, as a shell reports it: the job did not finish, a rerun resumes it.
    sys.exit(128 + signal.Signals[summary["stopped_by"]])


def run() -> None:
  """`train.py` and the ``minet-train`` console script: parse sys.argv, train, exit."""
  app.run(main, flags_parser=parse_flags)
