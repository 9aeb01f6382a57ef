"""FATHOM's schedule on the one one-run driver: each round's hyperparameters, from the study.

:func:`fathom_tune.fathom.optimize` runs :class:`FathomSchedule` on
:class:`fathom_tune.tuning.one_run.OneRun`, which records each round as the
trial FathomSampler's ask-and-tell protocol would write
(:func:`fathom_tune.storage.record.round_trial`: its three parameters,
``fathom.G``, ``fathom.H``, cost, evaluations; training loss as value, ``FAIL``
and ``fathom.diverged`` for a diverged round). With the safety net on
(:class:`fathom_tune.SafetyNet`), a rejected round (non-finite, or blown up)
is ``FAIL`` with the driver's ``rejected``/``rejection`` attrs, from which
the sampler derives the back-off (eta halved, the last accepted round's E and
B; :func:`~fathom_tune.fathom.state.rejected_hparams`); with it off, FATHOM is
the paper's: only a non-finite round is discarded, and eta halved.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from fathom_tune.engine import RoundResult, ServerState
from fathom_tune.fathom.hypergrad import TrackedState, local_hypergradient
from fathom_tune.fathom.sampler import (
    FATHOM_G,
    FATHOM_H,
    FathomSampler,
    report_divergence,
    report_round,
)
from fathom_tune.fathom.state import rejected_hparams
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.storage.record import NON_FINITE
from fathom_tune.tuning.one_run import OneRunSchedule

__all__ = ["ROUND_HEADER", "FathomSchedule", "HypergradientSchedule"]

_rounds_log = logging.getLogger("fathom_tune.rounds")
"""One INFO line per round (a command line turns it on to show the run as it happens)."""

ROUND_HEADER = f"{'round':>5} {'eta':>9} {'E':>8} {'B':>8} {'steps':>6} {'H':>7} {'G':>7} {'loss':>9}  validation"


class HypergradientSchedule(OneRunSchedule):
    """What every schedule on FATHOM's hypergradients shares (FATHOM's own and ``fathom-auto``):
    the engine's server optimizer is ``track_agreement(...)``, whose state holds ``H``
    and ``m``; the checkpoint keeps ``m`` apart (``momentum``) from the wrapped optimizer's
    state, so the layout is the same whatever server optimizer it wraps; the history
    leads with the hyperparameters, ``H`` and ``G``."""

    def _seen(self, result: RoundResult, accepted: bool) -> None:
        """The round's ``H`` (``nan`` when it was not accepted) and ``G``, in ``self._row``."""
        G = local_hypergradient(result.statistic, result.num_examples)
        # H = cos(m, u) came with the round, in the track_agreement state.
        h = float(result.opt_state.h) if accepted else math.nan
        self._row = {"H": h, "G": G}

    def history(self, frame):
        order = ["round", *NAMES, "local_steps", "H", "G", "train_loss"]
        return frame[order + [c for c in frame.columns if c not in order]]

    def stored(self, state: ServerState) -> tuple[ServerState, dict]:
        tracked: TrackedState = state.opt_state
        return dataclasses.replace(state, opt_state=tracked.inner), {"momentum": tracked.momentum}

    def unstored(self, fresh: ServerState, state: ServerState, trees: dict) -> ServerState:
        tracked = fresh.opt_state._replace(inner=state.opt_state, momentum=trees["momentum"])
        return dataclasses.replace(state, opt_state=tracked)


class FathomSchedule(HypergradientSchedule):
    """FATHOM as a one-run schedule: its state is the study's rounds and the server's ``m``.

    The hyperparameters come from :meth:`FathomSampler.after` the previous
    round (the one hyper step, as the sampler derives it from that round's
    trial), starting from :meth:`FathomSampler.next_hparams` of the study.
    The engine's server optimizer is ``track_agreement(...)``: its state holds
    ``H`` and ``m``, and the checkpoint keeps ``m`` apart (``momentum``) from the
    wrapped optimizer's state, so the layout is the same whatever server
    optimizer FATHOM wraps. Rounds the study finished past the checkpoint are
    run again with their recorded hyperparameters.
    """

    def __init__(self, sampler: FathomSampler):
        self.sampler = sampler
        self.next = sampler.config.init
        self._row: dict = {}

    def opened(self, study) -> None:
        self.next = self.sampler.next_hparams(study)

    def propose(self, round_index: int) -> HParams:
        return self.next

    def replay(self, round_index: int, trial) -> HParams:
        return HParams(**{n: trial.params[n] for n in NAMES})

    def observed(self, result: RoundResult, metrics, accepted: bool) -> None:
        if _rounds_log.isEnabledFor(logging.INFO):
            hp, h, G = result.hparams, self._row["H"], self._row["G"]
            shown = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
            _rounds_log.info(
                f"{result.round:5d} {hp.learning_rate:9.4g} {hp.local_epochs:8.4g} {hp.batch_size:8.4g} "
                f"{int(result.local_steps.sum()):6d} {h:7.3f} {G:7.3f} {result.train_loss:9.4g}  {shown}"
            )

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        self._seen(result, accepted)
        reported = _Attrs()
        if accepted:  # G and H as report_round records them (clamped to [-1, 1])
            report_round(reported, G=self._row["G"], H=self._row["H"])
        else:
            report_divergence(reported)
        # what the sampler's following() of this round's trial gives, without the trial
        self.next = self.sampler.after(
            result.hparams, G=reported.get(FATHOM_G), H=reported.get(FATHOM_H), diverged=not accepted
        )
        return dict(reported)

    def rejected(self, result: RoundResult, rejection) -> dict:
        self._seen(result, False)
        reported = _Attrs()
        if rejection.reason == NON_FINITE:
            report_divergence(reported)
        # what the sampler's following() of this round's trial gives, without the trial
        self.next = rejected_hparams(result.hparams, rejection.back_to, rejection.reset, self.sampler.config)
        return dict(reported)

    def relearn(self, trial, result: RoundResult, accepted: bool, rejection=None) -> dict:
        self._seen(result, accepted)
        self.next = self.sampler.following(trial) or self.next
        return {}

    def columns(self, attrs: dict) -> dict:
        return self._row

    def returned(self) -> HParams:
        return self.next

    def trees(self) -> dict:
        return {}  # derived from the study

    def restore(self, trees: dict) -> None:
        pass

    def search_space(self, task) -> dict:
        return self.sampler.search_space


class _Attrs(dict):
    """User attrs gathered for a trial template, through the writers that set them on a trial."""

    def set_user_attr(self, key, value) -> None:
        self[key] = value
