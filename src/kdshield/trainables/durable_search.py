"""``OptunaSearch`` for a study that outlives its driver.

A driver can die after Optuna recorded a trial as finished (``study.tell``) but before Tune saved
its own experiment state. ``kdshield tune --resume`` then restores a searcher that does not know
the trial finished, Tune re-launches the trial, the trial reports its stored result again, and
stock ``OptunaSearch`` passes that report to ``Trial.report`` on a finished Optuna trial, which
raises ``UpdateFinishedTrialError`` and stops the search. Here a report or completion for a trial
the study already holds as finished is dropped (the study has its value), not an error.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class DurableOptunaSearch(OptunaSearch):
    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        if ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or self._finished_in_study(trial_id):
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or self._finished_in_study(trial_id):
            return
        super().on_trial_complete(trial_id, result, error)
