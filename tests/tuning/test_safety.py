"""The one-run driver's safety net: a round that blows up is rejected, its model dropped, the tuner backs off."""

import dataclasses

import jax
import numpy as np
import optuna
import pytest
from _toy import flat, toy_task
from optuna.trial import TrialState

import fathom_tune
from fathom_tune import SafetyNet, record
from fathom_tune.engine import Engine
from fathom_tune.peers import FedEx, FedHyper
from fathom_tune.storage.reader import read_run
from fathom_tune.tuning.safety import restart_server

optuna.logging.set_verbosity(optuna.logging.WARNING)

HUGE = 5.9e12  # the finite training loss of the measured blow-up


def blow_up(monkeypatch, rounds, loss=HUGE):
    """Makes every engine report training ``loss`` (finite) in ``rounds``; returns the server
    states each round started from, ``round -> ServerState``."""
    real = Engine.run_round
    started = {}

    def run_round(self, state, hparams):
        started[state.round] = state
        new_state, result = real(self, state, hparams)
        if state.round in rounds:
            result = dataclasses.replace(result, train_loss=loss)
        return new_state, result

    monkeypatch.setattr(Engine, "run_round", run_round)
    return started


def _flat(tree):
    return flat(tree) if jax.tree_util.tree_leaves(tree) else np.zeros(0)


def _same_state(a, b) -> bool:
    return np.array_equal(flat(a.params), flat(b.params)) and np.array_equal(_flat(a.opt_state), _flat(b.opt_state))


# ------------------------------------------------------------------ the net's fields
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"factor": 1.0}, ValueError, "SafetyNet.factor must be a finite number > 1, got 1.0"),
        ({"factor": float("inf")}, ValueError, "SafetyNet.factor must be a finite number > 0, got inf"),
        ({"window": 0}, ValueError, "SafetyNet.window must be >= 1, got 0"),
        ({"patience": 1.5}, TypeError, "SafetyNet.patience must be an int, got 1.5 (float)"),
    ],
)
def test_the_net_names_a_bad_field_its_value_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error) as info:
        SafetyNet(**kwargs)
    assert str(info.value) == message


def test_the_verdict_compares_with_the_median_of_the_last_window_accepted_losses():
    net = SafetyNet(factor=10.0, window=3)
    assert net.verdict(float("nan"), finite=True, recent=[]) == record.NON_FINITE
    assert net.verdict(1.0, finite=False, recent=[1.0]) == record.NON_FINITE
    assert net.verdict(1e9, finite=True, recent=[]) is None  # nothing to compare with yet
    assert net.verdict(25.0, finite=True, recent=[100.0, 2.0, 2.0, 3.0]) == record.BLOW_UP  # median 2
    assert net.verdict(19.0, finite=True, recent=[100.0, 2.0, 2.0, 3.0]) is None
    assert net.verdict(5.0, finite=True, recent=[-1.0, -2.0, 0.0]) is None  # median <= 0: not judged
    watch = net.watch([{"train_loss": 1.0, "accepted": True, "learning_rate": 0.1, "local_epochs": 1.0,
                        "batch_size": 10.0}, {"train_loss": 9e9, "accepted": False, "learning_rate": 0.2,
                                              "local_epochs": 2.0, "batch_size": 5.0}])
    assert list(watch.recent) == [1.0] and watch.streak == 1 and watch.back_to.learning_rate == 0.1


def test_restart_server_restarts_only_the_server_factor():
    from fathom_tune.peers import fedhyper_server

    state = Engine(toy_task()).init()
    assert _same_state(dataclasses.replace(state, opt_state=restart_server(state.opt_state)), state)
    rule = fedhyper_server()
    learnt = rule.init({"w": np.zeros(2, np.float32)})._replace(a=np.float32(0.7))
    kept = restart_server({"inner": learnt, "other": np.ones(2)})
    assert float(kept["inner"].a) == 0.0 and kept["inner"].previous is learnt.previous
    assert kept["other"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ FATHOM
def test_fathom_rejects_a_finite_blow_up_drops_its_model_and_backs_off(monkeypatch):
    k = 4
    started = blow_up(monkeypatch, {k})
    out = fathom_tune.optimize(toy_task(), num_rounds=8, eval_every=2)
    h = out.history
    # round k starts from round k-1's model; round k+1 from the same one, bit for bit
    assert not _same_state(started[k], started[k - 1])
    assert _same_state(started[k + 1], started[k])
    assert started[k + 1].round == k + 1
    assert not h["accepted"].iloc[k] and h["accepted"].drop(index=k).all()
    assert h["rejected"].iloc[k] == record.BLOW_UP and not h["diverged"].iloc[k]
    assert h["learning_rate"].iloc[k + 1] == h["learning_rate"].iloc[k] * 0.5
    for n in ("local_epochs", "batch_size"):  # round k's moves of E and B are undone
        assert h[n].iloc[k + 1] == h[n].iloc[k - 1]
    trial = out.study.trials[k]
    assert trial.state == TrialState.FAIL and trial.user_attrs[record.REJECTED] == record.BLOW_UP
    assert trial.user_attrs[record.REJECTION]["loss"] == HUGE
    assert record.DIVERGED not in trial.user_attrs and "fathom.diverged" not in trial.user_attrs
    assert out.cost.rounds == 8  # its cost still counts
    assert read_run(out.study).rejected_rounds == 1
    assert out.study.user_attrs[record.CONFIG]["safety_net"] == SafetyNet().settings()


def test_with_the_net_off_a_finite_blow_up_is_accepted_as_in_the_paper(monkeypatch):
    k = 4
    started = blow_up(monkeypatch, {k})
    out = fathom_tune.optimize(toy_task(), num_rounds=6, eval_every=2, safety_net=None)
    h = out.history
    assert h["accepted"].all() and "rejected" not in h and h["train_loss"].iloc[k] == HUGE
    assert not _same_state(started[k + 1], started[k])
    assert out.study.trials[k].state == TrialState.COMPLETE
    assert out.study.user_attrs[record.CONFIG]["safety_net"] is None
    assert read_run(out.study).rejected_rounds == 0


def test_after_patience_rejections_fathom_returns_to_the_last_accepted_rounds_hyperparameters(monkeypatch):
    k, patience = 3, 3
    started = blow_up(monkeypatch, set(range(k, k + patience)))
    out = fathom_tune.optimize(toy_task(), num_rounds=8, eval_every=2, safety_net=SafetyNet(patience=patience))
    h = out.history
    assert list(h["rejected"].iloc[k : k + patience]) == [record.BLOW_UP] * patience
    names = ["learning_rate", "local_epochs", "batch_size"]
    for r in range(k + 1, k + patience):  # eta halved again, E and B the last accepted round's
        assert h["learning_rate"].iloc[r] == h["learning_rate"].iloc[r - 1] * 0.5
        assert list(h[names[1:]].iloc[r]) == list(h[names[1:]].iloc[k - 1])
    assert list(h[names].iloc[k + patience]) == list(h[names].iloc[k - 1])
    assert _same_state(started[k + patience], started[k])
    told = [out.study.trials[r].user_attrs[record.REJECTION] for r in range(k, k + patience)]
    assert [t["streak"] for t in told] == [1, 2, 3] and [t["reset"] for t in told] == [False, False, True]


def test_a_non_finite_round_with_the_net_on_also_undoes_e_and_b(monkeypatch):
    blow_up(monkeypatch, {3}, loss=float("nan"))
    h = fathom_tune.optimize(toy_task(), num_rounds=5, eval_every=2).history
    assert h["rejected"].iloc[3] == record.NON_FINITE and h["diverged"].iloc[3]
    assert h["learning_rate"].iloc[4] == h["learning_rate"].iloc[3] * 0.5
    assert (h["local_epochs"].iloc[4], h["batch_size"].iloc[4]) == (h["local_epochs"].iloc[2], h["batch_size"].iloc[2])


# ------------------------------------------------------------------ identical without a blow-up
def _comparable(history):
    return history.drop(columns=["seconds"])


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
@pytest.mark.parametrize("tuner", ["fathom", "fedhyper-gm", "fedex"])
def test_a_run_that_never_blows_up_is_the_same_with_the_net_on_and_off(seed, tuner):
    task = toy_task(seed=seed).replace(num_rounds=6)
    if tuner == "fathom":
        on = fathom_tune.optimize(task, seed=seed)
        off = fathom_tune.optimize(task, seed=seed, safety_net=None)
    else:
        base = fathom_tune.tuners.get(tuner)
        on = base.run(task, seed=seed)
        off = dataclasses.replace(base, safety_net=None).run(task, seed=seed)
    assert on.history["accepted"].all() and "rejected" not in on.history
    assert _comparable(on.history).equals(_comparable(off.history))
    assert np.array_equal(flat(on.params), flat(off.params))
    assert on.hparams == off.hparams
    assert [t.value for t in on.study.trials] == [t.value for t in off.study.trials]


# ------------------------------------------------------------------ resume
class _Crash(Exception):
    pass


@pytest.mark.parametrize("how", ["interrupt", "study-ahead"])
def test_a_run_with_a_rejection_resumed_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, how):
    # rounds k..k+2 blow up; the run stops before k+2, whose verdict (a third rejection in a
    # row: back to round k-1's hyperparameters) needs the net's state from before the stop
    k, rounds = 4, 9
    task = toy_task()
    started = blow_up(monkeypatch, {k, k + 1, k + 2})
    real_run_round = Engine.run_round
    real_save = fathom_tune.storage.checkpoint.save_run
    kwargs = {"num_rounds": rounds, "eval_every": 2, "storage": f"sqlite:///{tmp_path}/s.db"}
    if how == "interrupt":  # interrupted in round k+2: rounds 0..k+1 and their checkpoint written
        def run_round(self, state, hparams):
            if state.round == k + 2:
                raise _Crash
            return real_run_round(self, state, hparams)

        monkeypatch.setattr(Engine, "run_round", run_round)
        kwargs["flush_seconds"] = 3600
    else:  # rounds 3-5 committed, their checkpoint (at 3 then) not: k, k+1 are replayed
        def save_run(path, *, progress, **kw):
            if progress.state.round == 6:
                raise _Crash
            return real_save(path, progress=progress, **kw)

        monkeypatch.setattr(fathom_tune.storage.checkpoint, "save_run", save_run)
        kwargs.update(checkpoint_every=3, flush_seconds=3600)
    with pytest.raises(_Crash):
        fathom_tune.optimize(task, checkpoint=tmp_path / "c.npz", **kwargs)
    monkeypatch.setattr(Engine, "run_round", real_run_round)
    monkeypatch.setattr(fathom_tune.storage.checkpoint, "save_run", real_save)
    blow_up(monkeypatch, {k, k + 1, k + 2})
    resumed = fathom_tune.optimize(task, checkpoint=tmp_path / "c.npz", **kwargs)
    plain = fathom_tune.optimize(task, num_rounds=rounds, eval_every=2)
    assert list(plain.history["rejected"].iloc[k : k + 3]) == [record.BLOW_UP] * 3
    assert plain.study.trials[k + 2].user_attrs[record.REJECTION]["reset"]
    assert np.array_equal(flat(resumed.params), flat(plain.params))
    assert _comparable(resumed.history).equals(_comparable(plain.history))
    got = [(t.state, t.value, t.params, t.user_attrs.get(record.REJECTION)) for t in resumed.study.trials]
    assert got == [(t.state, t.value, t.params, t.user_attrs.get(record.REJECTION)) for t in plain.study.trials]
    assert resumed.hparams == plain.hparams
    assert started  # the wrapper ran


# ------------------------------------------------------------------ the peers
def test_fedhyper_server_factor_after_a_rejected_round_is_its_initial_value(monkeypatch):
    k = 4
    task = toy_task().replace(num_rounds=6)
    started = blow_up(monkeypatch, {k})
    out = FedHyper("fedhyper-gm-net", "gm").run(task)
    assert out.history["rejected"].iloc[k] == record.BLOW_UP
    before, after = started[k].opt_state, started[k + 1].opt_state
    assert float(before.a) != 0.0 and float(after.a) == 0.0
    assert np.array_equal(flat(after.previous), flat(before.previous))  # the momentum is kept
    assert np.array_equal(flat(started[k + 1].params), flat(started[k].params))
    assert out.history["learning_rate"].iloc[k + 1] == out.history["learning_rate"].iloc[k] * 0.5
    started.clear()
    FedHyper("fedhyper-gm-off", "gm", safety_net=None).run(task)
    assert float(started[k + 1].opt_state.a) != 0.0  # net off: accepted, the factor carries on


def test_fathom_server_factor_after_a_rejected_round_is_its_initial_value(monkeypatch):
    k = 3
    started = blow_up(monkeypatch, {k})
    out = fathom_tune.tuners.get("fathom+server").run(toy_task().replace(num_rounds=5))
    assert out.history["rejected"].iloc[k] == record.BLOW_UP
    assert float(started[k].opt_state.inner.a) != 0.0 and float(started[k + 1].opt_state.inner.a) == 0.0
    assert np.array_equal(flat(started[k + 1].opt_state.momentum), flat(started[k].opt_state.momentum))


def test_fedex_moves_its_distribution_away_from_the_rejected_rounds_arms(monkeypatch):
    k = 3
    blow_up(monkeypatch, {k})
    out = FedEx("fedex-net").run(toy_task().replace(num_rounds=5), seed=1)
    trials = out.study.trials
    assert trials[k].user_attrs[record.REJECTED] == record.BLOW_UP and trials[k].state == TrialState.FAIL
    candidates = out.study.user_attrs[record.FEDEX_CANDIDATES]["learning_rate"]
    drawn = {candidates.index(a[0]) for a in trials[k].user_attrs[record.FEDEX_ARMS]}
    assert len(drawn) < len(candidates)
    before = trials[k - 1].user_attrs[record.FEDEX_THETA]["learning_rate"]
    after = trials[k].user_attrs[record.FEDEX_THETA]["learning_rate"]
    assert sum(after[i] for i in drawn) < sum(before[i] for i in drawn)
    assert all(after[i] > before[i] for i in range(len(candidates)) if i not in drawn)
    # the baseline is not moved by the rejected round
    assert trials[k + 1].user_attrs[record.FEDEX_BASELINE] == trials[k].user_attrs[record.FEDEX_BASELINE]
