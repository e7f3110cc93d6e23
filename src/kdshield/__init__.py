"""kdshield: remove backdoors from language models by knowledge distillation.

The public API (everything else is internal)::

    import kdshield

    kdshield.list_defenses()                      # {"bedkd": "DMM -> MEPD identification -> ...", ...}
    run = kdshield.attack(train="train.parquet", test="test.parquet", model="minilm", out="run")
    metrics = kdshield.defend("bedkd", run="run", out="defended", settings={"target_frr": 0.05})
    summary = kdshield.tune("bedkd", run="run", out="search", num_samples=16)

Each function validates everything before any Ray work (bad input raises :class:`InputError`
with one line) and returns the job's metrics, as written to ``OUT/metrics.json``.
"""

from __future__ import annotations

from typing import Any

from kdshield.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__", "attack", "defend", "list_defenses", "tune"]


def list_defenses() -> dict[str, str]:
    """Every registered defense method and a one-line summary of it."""
    from kdshield import defenses  # imported on use: `import kdshield` stays light

    return {name: spec.summary for name, spec in defenses.specs().items()}


def attack(*, train: str, test: str, model: str, out: str, attack: str = "badnet", **settings: Any) -> dict:
    """Implant a backdoor (``kdshield attack``); ``settings`` are the command's other settings
    (``poison_rate``, ``target_label``, ``triggers``, ``training={...}``, ``scaling={...}`` ...).
    Writes the RUN directory ``out``; returns its metrics (CACC, ASR, no-trigger ASR)."""
    from kdshield.config import parse_settings
    from kdshield.trainables.attack import AttackJob, run_attack  # Ray and DeepSpeed: imported on use

    job = parse_settings(AttackJob, {"train": train, "test": test, "model": model, "out": out, "attack": attack,
                                     **settings}, source="attack")
    return run_attack(job)


def defend(method: str, *, out: str, settings: dict[str, Any] | None = None, **inputs: Any) -> dict:
    """Run a defense (``kdshield defend``): ``method`` is a name from :func:`list_defenses`,
    ``settings`` its settings, ``inputs`` either ``run=RUN`` or ``model``, ``train``, ``clean``,
    ``test`` (plus ``triggered_test``, ``target_label``), and optionally ``scaling={...}``,
    ``teacher_outputs``, ``overwrite``. Writes ``out``; returns its metrics."""
    from kdshield.config import parse_settings
    from kdshield.trainables.defend import DefendJob, run_defend  # Ray and DeepSpeed: imported on use

    job = parse_settings(DefendJob, {"method": method, "out": out, "params": dict(settings or {}), **inputs},
                         source="defend")
    return run_defend(job)


def tune(method: str, *, run: str, out: str, num_samples: int = 16, fixed: dict[str, Any] | None = None,
         **options: Any) -> dict:
    """Search a defense's settings (``kdshield tune``) on a RUN without its trigger (objective
    ``defender`` by default); ``fixed`` are settings every trial gets, ``options`` the command's
    other settings (``objective``, ``sampler``, ``scheduler``, ``storage``, ``scaling={...}`` ...).
    Writes ``out`` (study, trials, summary); returns the summary."""
    from kdshield.config import parse_settings
    from kdshield.trainables.tune import TuneJob, run_tune  # Ray Tune and Optuna: imported on use

    job = parse_settings(TuneJob, {"method": method, "run": run, "out": out, "num_samples": num_samples,
                                   "fixed": dict(fixed or {}), **options}, source="tune")
    return run_tune(job)
