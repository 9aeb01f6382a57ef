"""Crash-safe state of a FATHOM Flower run: what a new ServerApp needs to continue one.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
keeps two things besides the study's trials: the model and the moving
average ``m`` of global updates. :func:`save` writes both after every round
(atomically, :func:`fathom_tune.storage.checkpoint.save_checkpoint`) together with
the round's pending ``tell``; :func:`restore` reads them back and reconciles
the study: the round saved but not told is told, a round a killed server
left running is failed and marked stale (the resumed run redoes it).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import optuna
from optuna.trial import TrialState

from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import record

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
        held = len(study.get_trials(deepcopy=False))
        if held:
            raise ValueError(
                f"study {study.study_name!r} already holds {held} rounds; a FATHOM run cannot "
                "continue without its model: use another study_name or storage, or the checkpoint "
                "of the run that wrote it"
            )
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
    _reconcile(study, checkpoint, state.done, meta.get("pending"))
    return state


def _reconcile(
    study: optuna.Study, checkpoint: pathlib.Path, done: int, pending: dict | None
) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if pending is not None and trial.number == pending["trial"]:  # saved, not told
            if pending["value"] is None:
                study.tell(trial.number, state=TrialState.FAIL)
            else:
                study.tell(trial.number, pending["value"])
        else:  # killed mid-round: the resumed run redoes that round
            record.mark_stale(study, trial)
    record.finished_rounds(study, done, checkpoint)


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
