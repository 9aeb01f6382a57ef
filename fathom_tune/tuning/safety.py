"""The safety net of every one-run tuner: a round that blows up is rejected and its model dropped.

Design principle 0: a tuner must never leave a run worse than not tuning. The
one one-run driver (:class:`fathom_tune.tuning.one_run.OneRun`) judges every
round with a :class:`SafetyNet` before the round loop keeps its model:

* a round is **rejected** when its training loss or its update is not finite
  (``"non-finite"``), or when its training loss exceeds ``factor`` times the
  median training loss of the last ``window`` accepted rounds (``"blow-up"``;
  judged once a round has been accepted and while that median is above 0);
* a rejected round's model is dropped: the next round starts from the last
  accepted model (and its server optimizer state, but see below); its cost
  still counts;
* the tuner backs off (:meth:`~fathom_tune.tuning.one_run.OneRunSchedule.rejected`:
  FATHOM halves eta and undoes that round's B and E moves, FedHyper halves its
  base rate, FedEx penalises the arms the round drew), and every
  ``patience``-th consecutive rejection returns the schedule to the
  hyperparameters of the last accepted round;
* each server optimizer state node with a ``restarted()`` method (FedHyper's
  server factor, :class:`fathom_tune.peers.FedHyperServerState`) is replaced by
  what it returns, so a learned server step starts over (:func:`restart_server`).

The verdict depends only on the run's history rows (training loss,
``accepted`` and the hyperparameters of each round): :meth:`SafetyNet.watch`
rebuilds it from the rows of a checkpoint, so a resumed run decides exactly as
an uninterrupted one. Every rejected round's trial records why
(:data:`fathom_tune.storage.record.REJECTED`) and what the tuner was told
(:data:`~fathom_tune.storage.record.REJECTION`); the history has a
``rejected`` column. A run that never blows up is the same with the net on and
off, bit for bit.

Example:
    >>> net = SafetyNet()
    >>> net.factor, net.window, net.patience
    (10.0, 5, 3)
    >>> net.verdict(5.9e12, finite=True, recent=[1.1, 1.0, 1.2])
    'blow-up'
    >>> net.verdict(1.3, finite=True, recent=[1.1, 1.0, 1.2]) is None
    True
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence

import jax

from fathom_tune import checks
from fathom_tune.engine import RoundResult
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.storage.record import BLOW_UP, NON_FINITE

__all__ = ["BLOW_UP", "NON_FINITE", "Rejection", "SafetyNet", "Watch", "restart_server"]


@dataclasses.dataclass(frozen=True)
class SafetyNet:
    """When a round is rejected, and when the schedule returns to the last accepted round.

    Attributes:
        factor: a finite training loss above ``factor`` times the median of
            the recent accepted rounds' is a blow-up (a number > 1; default 10).
        window: how many of the last accepted rounds that median is over
            (an int >= 1; default 5).
        patience: after every ``patience`` consecutive rejections the next
            round uses the last accepted round's hyperparameters (an int >= 1;
            default 3).

    Raises:
        TypeError, ValueError: a field out of range, naming the field, the
            value and what is allowed.
    """

    factor: float = 10.0
    window: int = 5
    patience: int = 3

    def __post_init__(self):
        factor = checks.positive_finite("SafetyNet.factor", self.factor)
        if not factor > 1.0:
            raise ValueError(f"SafetyNet.factor must be a finite number > 1, got {self.factor!r}")
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "window", checks.positive_int("SafetyNet.window", self.window))
        object.__setattr__(self, "patience", checks.positive_int("SafetyNet.patience", self.patience))

    def settings(self) -> dict:
        """The fields as a dict (recorded in the study config and the checkpoint fingerprint)."""
        return {"factor": self.factor, "window": self.window, "patience": self.patience}

    def verdict(self, loss: float, *, finite: bool, recent: Sequence[float]) -> str | None:
        """Why a round with training ``loss`` is rejected (``"non-finite"``, ``"blow-up"``), or
        ``None`` when it is accepted; ``recent``: the accepted rounds' losses, oldest first."""
        if not finite or not math.isfinite(loss):
            return NON_FINITE
        recent = list(recent)[-self.window :]
        if recent:
            median = statistics.median(recent)
            if median > 0 and loss > self.factor * median:
                return BLOW_UP
        return None

    def watch(self, rows: Iterable[dict] = ()) -> Watch:
        """A :class:`Watch` that has seen the history ``rows`` (e.g. a checkpoint's)."""
        out = Watch(self)
        for row in rows:
            out.saw(float(row["train_loss"]), bool(row["accepted"]), HParams(**{n: row[n] for n in NAMES}))
        return out


@dataclasses.dataclass(frozen=True)
class Rejection:
    """What the driver tells a schedule about a round the net rejected.

    Attributes:
        reason: ``"non-finite"`` or ``"blow-up"``.
        loss: the round's training loss.
        median: the median the loss was compared with (``None``: not compared).
        streak: consecutive rejected rounds, this one included (1, 2, ...).
        reset: ``streak`` is a multiple of the net's ``patience``: the next
            round returns to ``back_to``.
        back_to: the hyperparameters of the last accepted round (its summary
            when clients had their own), ``None`` while no round was accepted.
    """

    reason: str
    loss: float
    median: float | None
    streak: int
    reset: bool
    back_to: HParams | None

    def record(self) -> dict:
        """As the trial records it (:data:`fathom_tune.storage.record.REJECTION`; JSON values)."""
        return {
            "loss": self.loss if math.isfinite(self.loss) else None,
            "median": self.median,
            "streak": self.streak,
            "reset": self.reset,
            "back_to": None if self.back_to is None else self.back_to.as_dict(),
        }


class Watch:
    """A run's net state: the last ``window`` accepted losses, the rejection streak and the
    last accepted round's hyperparameters (:meth:`SafetyNet.watch` builds it from rows)."""

    def __init__(self, net: SafetyNet):
        self.net = net
        self.recent: collections.deque = collections.deque(maxlen=net.window)
        self.streak = 0
        self.back_to: HParams | None = None

    def saw(self, loss: float, accepted: bool, hparams: HParams) -> None:
        """Takes a finished round into the state."""
        if accepted:
            self.recent.append(loss)
            self.streak, self.back_to = 0, hparams
        else:
            self.streak += 1

    def judge(self, result: RoundResult) -> Rejection | None:
        """The verdict on ``result`` (``None``: accepted), taken into the state."""
        reason = self.net.verdict(result.train_loss, finite=result.finite, recent=self.recent)
        rejection = None
        if reason is not None:
            streak = self.streak + 1
            median = statistics.median(self.recent) if self.recent else None
            rejection = Rejection(
                reason=reason, loss=float(result.train_loss), median=None if median is None else float(median),
                streak=streak, reset=streak % self.net.patience == 0, back_to=self.back_to,
            )
        self.saw(float(result.train_loss), reason is None, result.hparams)
        return rejection


def restart_server(opt_state):
    """``opt_state`` with every node that has a ``restarted()`` method replaced by what it returns
    (FedHyper's server factor back to its start); other parts as they are.

    >>> restart_server({"w": 1.0})
    {'w': 1.0}
    """
    def restartable(node) -> bool:
        return callable(getattr(node, "restarted", None))

    return jax.tree_util.tree_map(
        lambda node: node.restarted() if restartable(node) else node, opt_state, is_leaf=restartable
    )
