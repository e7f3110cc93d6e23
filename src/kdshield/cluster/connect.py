"""Start or join Ray with the environment kdshield's workers need."""

from __future__ import annotations

import logging
import os

from kdshield.outputs import VERBOSE_ENV, verbose

_STARTED_LOCAL: list[bool] = [False]
DASHBOARD_ENV = "KDSHIELD_RAY_DASHBOARD"


def started_local() -> bool:
    """Whether this process's Ray is a local instance that :func:`connect` started itself."""
    import ray

    return _STARTED_LOCAL[0] and ray.is_initialized()


def default_env() -> dict[str, str]:
    """Environment variables every Ray process of a job gets.

    Without a GPU, DeepSpeed must be told to use its CPU accelerator (it probes CUDA
    otherwise); ``KDSHIELD_CACHE`` is forwarded so workers find the same asset cache.
    """
    import torch

    env = {"TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    if verbose():
        env[VERBOSE_ENV] = "1"
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("KDSHIELD_CACHE"):
        env["KDSHIELD_CACHE"] = os.environ["KDSHIELD_CACHE"]
    return env


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool | None = None) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://host:10001``), or start a local one.

    Without ``address``, ``RAY_ADDRESS`` is joined when set (as inside a Ray job), and otherwise
    a new local instance is started even when another Ray runs on this machine (plain
    ``ray.init()`` would join that one). A no-op when Ray is already initialised in this process. Token authentication stays as
    Ray configures it (on by default for local clusters).
    """
    import ray

    if ray.is_initialized():
        return
    quiet = not verbose() if quiet is None else quiet
    if quiet:
        quiet_process()
    os.environ.update(default_env())  # the driver's own DeepSpeed imports too
    kwargs = {"runtime_env": {"env_vars": default_env()},
              "logging_level": logging.WARNING if quiet else logging.INFO,
              # every Ray process's Python loggers (Ray Data's per-dataset "execution finished" lines
              # in Train's SplitCoordinator actors among them); kdshield's own lines are prints
              "logging_config": ray.LoggingConfig(log_level="WARNING" if quiet else "INFO")}
    address = address or os.environ.get("RAY_ADDRESS")  # a RayJob's entrypoint joins its cluster
    if address:
        ray.init(address=address, **kwargs)
    else:  # "local": never silently join another cluster that happens to run on this machine
        # KDSHIELD_RAY_DASHBOARD=0: no dashboard processes (the test suite, which starts Ray dozens of times)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 include_dashboard=None if os.environ.get(DASHBOARD_ENV, "1") != "0" else False, **kwargs)
    _STARTED_LOCAL[0] = not address
    logging.getLogger("ray.data").setLevel(logging.WARNING if quiet else logging.INFO)
    ordered_data()


class _Harmless(logging.Filter):
    """Ray's notices that read like failures to a new user and ask nothing of them."""

    SOURCES = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress",
               "ray.data._internal.execution.streaming_executor")
    NOTICES = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled", "A new progress UI is available")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


def quiet_process() -> None:
    """Unless ``--verbose``: Ray's harmless notices filtered from this process's Ray log handlers,
    Optuna at WARNING. (Ray Data's progress bars follow :func:`ordered_data`.)"""
    if verbose():
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # on the loggers that emit them (a logger's own filters see every record it creates, whatever
    # handlers Ray sets up later) and on the handlers records propagate to
    loggers = [logging.getLogger(n) for n in _Harmless.SOURCES]
    for name in ("ray", "ray.data", "ray.tune", "ray.train"):
        loggers += logging.getLogger(name).handlers
    for target in [*loggers, *logging.getLogger().handlers]:
        if not any(isinstance(f, _Harmless) for f in target.filters):
            target.addFilter(_Harmless())


def ordered_data():
    """Make this process's Ray Data keep row order, and return its ``DataContext``.

    Ray Data may hand out blocks in completion order, so without this a stream computed afresh
    (tokenisation, teacher outputs) and the same stream read back from the stage cache can reach
    training in different orders, and a configuration re-run does not reproduce its result.
    Call it in every process that builds or consumes datasets (the driver, each Tune trial)."""
    import ray.data

    quiet_process()  # a Tune trial's process too: its first dataset would print Ray Data's notice
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # one bar per tiny dataset, from every trial and worker at once: only for --verbose
    ctx.enable_progress_bars = ctx.print_on_execution_start = verbose()
    # a consumer holds one block at a time, converted to numpy per batch: Ray's 128 MB default made
    # the attack's driver peak grow with the data (benchmarks/results/driver_memory.md)
    ctx.target_max_block_size = MAX_BLOCK_BYTES
    return ctx


MAX_BLOCK_BYTES = 16 * 1024**2
