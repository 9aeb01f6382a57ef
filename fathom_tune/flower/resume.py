"""Crash-safe state of a FATHOM Flower run: what a new ServerApp needs to continue one.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
keeps two things besides the study's trials: the model and the moving
average ``m`` of global updates. :func:`save` writes both after every round
(atomically, :func:`fathom_tune.storage.checkpoint.save_checkpoint`) together with
the round's pending ``tell``; :func:`restore` reads them back and settles
the study as every one-run tuner's resume does
(:func:`fathom_tune.tuning.driver.settle`): the round saved but not told is
told, a round a killed server left running is failed and marked stale (the
resumed run redoes it), and the rounds before the checkpoint must be there.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import optuna
from optuna.trial import TrialState

from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.tuning import driver

__all__ = ["CHECKPOINT_KIND", "RunState", "restore", "save"]

CHECKPOINT_KIND = "fathom-flower"


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a run stands.

    Attributes:
        model: the current global model, ``{name: array}``.
        momentum: FATHOM's ``m``, shaped like ``model``.
        done: rounds finished (the next round's 0-based index).
        validation: the latest validation metrics.
    """

    model: dict
    momentum: dict
    done: int
    validation: dict


def restore(study: optuna.Study, checkpoint: pathlib.Path | None, x0: dict) -> RunState:
    """The state to start from: fresh at ``x0``, or the checkpoint's with the study reconciled.

    Raises:
        ValueError: no checkpoint exists but the study already holds trials.
        fathom_tune.CheckpointError: the checkpoint is damaged, from another
            model or study, or the study lacks rounds the checkpoint has done.
    """
    zeros = {k: np.zeros_like(v) for k, v in x0.items()}
    if checkpoint is None or not checkpoint.exists():
        driver.refuse_held(study.study_name, len(study.get_trials(deepcopy=False)))
        return RunState(model=x0, momentum=zeros, done=0, validation={})
    meta, trees = ckpt.load_checkpoint(
        checkpoint, kind=CHECKPOINT_KIND, templates={"model": x0, "momentum": zeros}
    )
    if meta["study"] != study.study_name:
        raise ckpt.CheckpointError(
            f"checkpoint {str(checkpoint)!r} belongs to study {meta['study']!r}, not "
            f"{study.study_name!r}"
        )
    state = RunState(
        model=trees["model"],
        momentum=trees["momentum"],
        done=int(meta["round"]),
        validation=meta.get("validation") or {},
    )
    pending = meta.get("pending")

    def told(trial) -> bool:  # the round saved but not told
        if pending is None or trial.number != pending["trial"]:
            return False
        if pending["value"] is None:
            study.tell(trial.number, state=TrialState.FAIL)
        else:
            study.tell(trial.number, pending["value"])
        return True

    driver.settle(study, state.done, checkpoint, told)
    return state


def save(
    checkpoint: pathlib.Path, study: optuna.Study, state: RunState, *, trial: int, value
) -> None:
    """Writes ``state`` and how to tell round trial ``trial`` (``value``; ``None``: FAIL)."""
    ckpt.save_checkpoint(
        checkpoint,
        kind=CHECKPOINT_KIND,
        meta={
            "study": study.study_name,
            "round": state.done,
            "validation": state.validation,
            "pending": {"trial": trial, "value": value},
        },
        trees={"model": state.model, "momentum": state.momentum},
    )
