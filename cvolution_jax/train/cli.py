"""What the training entry points (`experiments.imagenet`, `experiments.coco`) share: flags and main().

    cli.define_flags()                                   # at import, before absl parses
    app.run(lambda argv: cli.run(argv, Classification()), flags_parser=cli.parse_flags)   # a Task

`--config` (an ml_collections config file; `config.mode` "train" or "eval"), `--workdir`, and
the multi-process flags: `--multihost` calls `jax.distributed.initialize()`, which reads the
cluster from SLURM, Open MPI or Kubernetes; or `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` give it explicitly.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from cvolution_jax import tasks
from cvolution_jax.train import checkpoint
from cvolution_jax.train import distributed
from cvolution_jax.train import loop
from cvolution_jax.train.loop import DivergedError
from cvolution_jax.train.workdir_lock import WorkdirInUse


def define_flags() -> None:
    """Defines the flags every entry point takes."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
    flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the cluster environment (SLURM, Open MPI, Kubernetes).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator; with --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_integer("heartbeat_timeout_seconds", distributed.HEARTBEAT_TIMEOUT_SECONDS, "Multi-process: fail after a peer is silent this long.")
    flags.mark_flags_as_required(["config", "workdir"])


def config_path_problem(argv: list[str]) -> str | None:
    """What is wrong with the `--config` file `argv` names, in one sentence; None if it is a file to load.

    ml_collections defers a missing file's error to the first use of the config, as a traceback;
    this says it before anything runs. A run's own `config.json` is not a config file either.
    """
    path = _config_arg(argv)
    if path is None:
        return None
    file = path.split(":", 1)[0]  # `file.py:arg` passes `arg` to get_config
    if file.endswith(".json"):
        return (f"--config {path} is a run's saved config (JSON), not a config file. To resume that run, rerun the "
                f"command that started it: its --config file (.py, get_config()) and the same --workdir, which "
                f"holds the checkpoints (config.json records the fields it trained with).")
    if not os.path.isfile(file):
        return (f"--config {path}: no such file{' (it is a directory)' if os.path.isdir(file) else ''}; give a config "
                f"file with get_config(), e.g. experiments/configs/default.py.")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`), except that a `--config`
    file that is missing or a run's `config.json` (`config_path_problem`), or an override of a
    field the config lacks (`--config.no_such_field=1`, where ml_collections raises an
    AttributeError) exits with one line naming it."""
    # The file is loaded on its own first: absl would wrap its error in a usage message with a traceback.
    problem = config_path_problem(argv) or _config_file_error(argv)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        remaining = app.parse_flags_with_usage(argv)
        config = flags.FLAGS.config  # ml_collections loads the file lazily: its own errors surface here
    except Exception as error:  # noqa: BLE001 - re-raised unless an override names no field
        message = _unknown_override(argv) if isinstance(error, (AttributeError, KeyError)) else None
        if message is None:  # not a mistyped override: a bug, whose traceback is wanted
            raise
        sys.exit(f"error: {message}")
    del config
    return remaining


def _config_arg(argv: list[str]) -> str | None:
    """The value of `--config` in `argv` (`file.py` or `file.py:argument`; "" when it has none), the
    last one as absl takes it; None if `argv` has no `--config`."""
    path = None
    for i, arg in enumerate(argv[1:], 1):
        name, equals, value = arg.partition("=")
        if name in ("--config", "-config"):
            path = value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
    return path


def _config_file_error(argv: list[str]) -> str | None:
    """`config_file_problem` of the `--config` file of `argv`; None if it loads or none is given."""
    path = _config_arg(argv)
    return None if path is None else config_file_problem(path, flags.FLAGS["config"].parser)


def config_file_problem(path: str, parser) -> str | None:
    """What goes wrong loading config file `path` (`file.py` or `file.py:argument`) on its own with
    ml_collections' flag `parser`, in one sentence: a syntax error, no `get_config`, `get_config`
    raising or returning something else than a ConfigDict. None if it loads."""
    # ml_collections loads the file as module `<flag>_config` with SourceFileLoader.load_module,
    # which runs a file inside the module of that name if one is loaded already: the get_config of
    # a config loaded earlier in this process would survive into a file that defines none.
    sys.modules.pop(f"{parser.name}_config", None)
    try:
        config = parser.parse(path)
    except Exception as error:  # noqa: BLE001 - whatever the user's file raises is the message
        return (f"--config {path} could not be loaded ({checkpoint.brief_error(error, limit=400)}). A config file is "
                f"Python defining get_config() that returns an ml_collections.ConfigDict, e.g. experiments/configs/default.py.")
    if not isinstance(config, config_dict.ConfigDict):
        return (f"--config {path}: get_config() returned a {type(config).__name__}; it must return an "
                f"ml_collections.ConfigDict, e.g. experiments/configs/default.py.")
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """What is wrong with the first `--config.a.b` override of `argv` whose field the config file
    does not have, or None if every field exists."""
    path = _config_arg(argv)
    overrides = [arg.lstrip("-").partition("=")[0][len("config."):] for arg in argv[1:]
                 if arg.startswith("-") and arg.lstrip("-").startswith("config.")]
    if not path:
        return None
    try:
        config = flags.FLAGS["config"].parser.parse(path)  # loads the file again, without overrides
    except Exception:  # noqa: BLE001 - the file's own error is absl's to report
        return None
    for override in overrides:
        node, keys = config, override.split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, config_dict.ConfigDict):
                break  # an index into a tuple field, or a field of a non-config value: ml_collections' to judge
            if key not in node:
                where = ".".join(["config", *keys[:depth]])
                close = difflib.get_close_matches(key, list(node.keys()), n=1)
                guess = f" (did you mean {where}.{close[0]}?)" if close else ""
                return (f"--config.{override}: {path} has no field {where}.{key}{guess}; the fields of {where} are "
                        f"{', '.join(sorted(node.keys()))}. Fix the spelling, or add the field to the config file.")
            node = node[key]
    return None


def _initialize_distributed() -> None:
    FLAGS = flags.FLAGS
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        distributed.initialize(*explicit, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    elif FLAGS.multihost:
        distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


def run(argv, task: loop.Task) -> None:
    """The body of an entry point's main: `loop.train_and_evaluate(task, config, workdir)` or
    `loop.evaluate(task, config, workdir, step)` as `config.mode` says. A user error (bad config,
    missing checkpoint, divergence) exits with its message rather than a traceback."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    _initialize_distributed()
    FLAGS = flags.FLAGS
    config = FLAGS.config
    with exits_with_a_message(FLAGS.workdir):
        named = tasks.name_of(config)
        if named != task.name:
            raise ValueError(f"--config is a {named} config (config.task={named!r}), and this entry point trains "
                             f"{task.name}: run it with python -m {tasks.get(named).entry_point}.")
        if config.mode == "train":
            loop.train_and_evaluate(task, config, FLAGS.workdir)
        elif config.mode == "eval":
            loop.evaluate(task, config, FLAGS.workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
        else:
            raise ValueError(f"--config.mode must be 'train' or 'eval'; got {config.mode!r}.")


@contextlib.contextmanager
def exits_with_a_message(workdir: str):
    """`with cli.exits_with_a_message(workdir):` around a run's work, in an entry point's main: a
    user error (bad config or data, missing checkpoint, divergence, a full disk, a workdir in use)
    or Ctrl-C exits with one line saying what to do, not a traceback."""
    try:
        yield
    except (DivergedError, FileNotFoundError, ValueError, WorkdirInUse) as error:  # CheckpointMismatchError is a ValueError
        sys.exit(f"error: {error}")
    except OSError as error:
        if not checkpoint.is_out_of_space(error):
            raise
        sys.exit(f"error: No space left on the disk of {error.filename or workdir} ({error.strerror}). Free space "
                 f"there and rerun the same command: it resumes from the last checkpoint.")
    except KeyboardInterrupt:  # Ctrl-C before the training steps began, in eval mode, or pressed twice
        # A save cut short leaves orbax's threads to fail at interpreter exit: this message is the one to show.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        sys.exit("Interrupted (Ctrl-C): nothing after the last complete checkpoint was saved (one being written is left "
                 "incomplete and ignored at the next start); rerun the same command to resume.")
