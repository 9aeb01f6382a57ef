"""Tests of fathom_tune.fathom.sampler: FathomSampler, one Optuna trial per round."""

from __future__ import annotations

import math
import pathlib
import re
import warnings

import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
    SingleOnlySamplerTestCase,
)
from optuna.trial import TrialState

from fathom_tune.fathom import (
    DIVERGED_LR_FACTOR,
    ClientTracker,
    FathomConfig,
    FathomSampler,
    ServerTracker,
    aggregate_round,
    report_divergence,
    report_round,
)
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.record import FATHOM_DIVERGED as DIVERGED_ATTR
from fathom_tune.record import FATHOM_G as G_ATTR
from fathom_tune.record import FATHOM_H as H_ATTR
from fathom_tune.record import FATHOM_REJECTED as REJECTED_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

INIT = HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0)
BOUNDS = Bounds(
    lower=HParams(learning_rate=1e-3, local_epochs=0.1, batch_size=1.0),
    upper=HParams(learning_rate=1.0, local_epochs=10.0, batch_size=256.0),
)


def make_sampler(**kwargs) -> FathomSampler:
    return FathomSampler(init=INIT, bounds=BOUNDS, **kwargs)


def fake_hypergradients(hp: HParams, number: int) -> tuple[float, float]:
    """Deterministic stand-ins for a round's (G, H), in [-1, 1], varying with both."""
    G = math.sin(3.0 * number + hp.batch_size)
    H = math.cos(2.0 * number + 10.0 * hp.learning_rate) * 0.9
    return G, H


def run_rounds(study: optuna.Study, sampler: FathomSampler, n: int) -> list[HParams]:
    used = []
    for _ in range(n):
        trial = study.ask()
        hp = sampler.suggest(trial)
        G, H = fake_hypergradients(hp, trial.number)
        report_round(trial, G=G, H=H)
        study.tell(trial, 1.0 / (1 + trial.number))
        used.append(hp)
    return used


def expected_next(hp: HParams, G: float, H: float, gamma=(0.01, 0.01, 0.1)) -> HParams:
    """The EGN step, written out here in NumPy (independent of egn_step);
    ``gamma = (gamma_eta, gamma_E, gamma_B)``."""
    lo = np.log([BOUNDS.lower.local_epochs, BOUNDS.lower.learning_rate, BOUNDS.lower.batch_size])
    hi = np.log([BOUNDS.upper.local_epochs, BOUNDS.upper.learning_rate, BOUNDS.upper.batch_size])
    log_e = np.log(hp.local_epochs) + gamma[1] * (H + G)
    log_eta = np.log(hp.learning_rate) + gamma[0] * H
    log_b = np.log(hp.batch_size) - gamma[2] * G
    e, eta, b = np.exp(np.clip([log_e, log_eta, log_b], lo, hi))
    return HParams(learning_rate=eta, local_epochs=e, batch_size=b)


def assert_hparams_close(a: HParams, b: HParams, rel: float = 1e-12) -> None:
    assert a.as_dict() == pytest.approx(b.as_dict(), rel=rel)


# --------------------------------------------------------------------------- the EGN schedule


def test_first_round_is_init_and_search_space_is_log_bounds():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    assert sampler.suggest(trial) == INIT
    assert trial.params == INIT.as_dict()
    assert sampler.search_space == {
        "learning_rate": FloatDistribution(1e-3, 1.0, log=True),
        "local_epochs": FloatDistribution(0.1, 10.0, log=True),
        "batch_size": FloatDistribution(1.0, 256.0, log=True),
    }
    assert sampler.config.init == INIT and sampler.config.bounds == BOUNDS


def test_suggestions_follow_the_egn_step():
    config = FathomConfig(gamma_local_epochs=0.05, gamma_learning_rate=0.2, gamma_batch_size=0.3)
    sampler = make_sampler(config=config)
    study = optuna.create_study(sampler=sampler)
    expected = INIT
    for number in range(12):
        trial = study.ask()
        hp = sampler.suggest(trial)
        assert_hparams_close(hp, expected)
        G, H = fake_hypergradients(hp, number)
        report_round(trial, G=G, H=H)
        study.tell(trial, 0.5)
        expected = expected_next(hp, G, H, gamma=config.gamma)
    assert study.trials[-1].user_attrs[G_ATTR] == pytest.approx(G)


def test_one_round_by_hand():
    # G = 0.8, H = 0.5 from (E, eta, B) = (1, 0.1, 20):
    # E = exp(0.01 * 1.3) = 1.013085, eta = 0.1 exp(0.005) = 0.100501, B = 20 exp(-0.08) = 18.462326
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    sampler.suggest(trial)
    report_round(trial, G=0.8, H=0.5)
    study.tell(trial, 1.0)
    hp = sampler.suggest(study.ask())
    assert hp.local_epochs == pytest.approx(1.013085, abs=1e-6)
    assert hp.learning_rate == pytest.approx(0.100501, abs=1e-6)
    assert hp.batch_size == pytest.approx(18.462326, abs=1e-6)


def test_bounds_are_respected_and_released_at_once():
    # G = H = 1 push E and eta up and B down, into their bounds.
    config = FathomConfig(gamma_local_epochs=0.5, gamma_learning_rate=0.5, gamma_batch_size=0.5)
    sampler = make_sampler(config=config)
    study = optuna.create_study(sampler=sampler)
    for _ in range(30):
        trial = study.ask()
        hp = sampler.suggest(trial)
        assert BOUNDS.contains(hp)
        report_round(trial, G=1.0, H=1.0)
        study.tell(trial, 0.0)
    assert hp == HParams(learning_rate=1.0, local_epochs=10.0, batch_size=1.0)
    # no wind-up: one round with H = -1, G = 0 leaves the upper bounds at once
    trial = study.ask()
    sampler.suggest(trial)
    report_round(trial, G=0.0, H=-1.0)
    study.tell(trial, 0.0)
    hp = sampler.suggest(study.ask())
    assert hp.learning_rate == pytest.approx(math.exp(-0.5))
    assert hp.local_epochs == pytest.approx(10.0 * math.exp(-0.5))
    assert hp.batch_size == 1.0


def test_concurrent_asks_get_the_same_suggestion():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    run_rounds(study, sampler, 2)
    a, b = study.ask(), study.ask()
    assert sampler.suggest(a) == sampler.suggest(b) == sampler.next_hparams(study)


# --------------------------------------------------------------------------- storage is the state


def _storages(tmp_path: pathlib.Path):
    sqlite = f"sqlite:///{tmp_path / 'fathom.db'}"
    journal = tmp_path / "fathom.log"
    return {
        "sqlite": lambda: sqlite,
        "journal": lambda: optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        ),
    }


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_reloaded_study_continues_exactly(tmp_path, kind):
    reference_sampler = make_sampler()
    reference = optuna.create_study(sampler=reference_sampler)
    uninterrupted = run_rounds(reference, reference_sampler, 9)

    storage = _storages(tmp_path)[kind]
    sampler = make_sampler()
    study = optuna.create_study(study_name="fathom", storage=storage(), sampler=sampler)
    first = run_rounds(study, sampler, 5)
    del study, sampler

    sampler = make_sampler()
    study = optuna.load_study(study_name="fathom", storage=storage(), sampler=sampler)
    second = run_rounds(study, sampler, 4)
    assert first + second == uninterrupted  # exact equality, float for float
    assert [t.params for t in study.trials] == [t.params for t in reference.trials]


# --------------------------------------------------------------------------- errors


def test_complete_round_without_hypergradients_fails_at_tell_and_is_skipped():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    run_rounds(study, sampler, 2)
    trial = study.ask()
    forgotten = sampler.suggest(trial)
    with pytest.raises(ValueError, match=re.escape("report_round(trial, G=..., H=...)")) as info:
        study.tell(trial, 0.3)
    assert "fathom.G='<missing>'" in str(info.value) and "trial 2" in str(info.value)
    stored = study.trials[-1]
    assert stored.state == TrialState.COMPLETE  # Optuna writes it regardless
    assert "fathom.G" in stored.system_attrs[REJECTED_ATTR]
    # the rejected round is skipped: the next round repeats its hyperparameters
    assert sampler.suggest(study.ask()) == forgotten


def test_invalid_hypergradient_values_are_rejected_at_tell():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    sampler.suggest(trial)
    trial.set_user_attr(G_ATTR, 0.5)
    trial.set_user_attr(H_ATTR, float("nan"))
    with pytest.raises(ValueError, match=r"fathom.H=nan"):
        study.tell(trial, 0.3)


def test_added_round_without_hypergradients_fails_at_the_next_suggestion():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    study.add_trial(
        optuna.create_trial(params=INIT.as_dict(), distributions=sampler.search_space, value=1.0)
    )
    with pytest.raises(ValueError, match="not told through FathomSampler.after_trial"):
        sampler.suggest(study.ask())


def test_a_round_must_hold_all_three_hyperparameters():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    trial.suggest_float("learning_rate", 1e-3, 1.0, log=True)
    report_round(trial, G=0.1, H=0.1)
    with pytest.raises(ValueError, match="FATHOM tunes the three together"):
        study.tell(trial, 0.3)
    assert sampler.suggest(study.ask()) == INIT  # not a round


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -2.0, "0.5", True, None])
def test_report_round_validates(bad):
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(ValueError, match="G must be a finite number in"):
        report_round(trial, G=bad, H=0.0)
    assert trial.user_attrs == {}  # nothing half-written


def test_report_round_accepts_array_scalars_and_clamps_rounding():
    study = optuna.create_study()
    trial = study.ask()
    report_round(trial, G=jnp.float32(0.25), H=np.float64(1.0 + 1e-9))
    assert trial.user_attrs == {G_ATTR: 0.25, H_ATTR: 1.0}
    assert all(type(v) is float for v in trial.user_attrs.values())


def test_constructor_validates():
    with pytest.raises(TypeError):
        FathomSampler(INIT, BOUNDS)  # keyword-only
    with pytest.raises(TypeError, match="init must be an HParams"):
        FathomSampler(init=INIT.as_dict(), bounds=BOUNDS)
    with pytest.raises(ValueError, match=r"FathomSampler init.batch_size=512.0 is outside"):
        FathomSampler(init=HParams(0.1, 1.0, 512.0), bounds=BOUNDS)
    with pytest.raises(ValueError, match="config.init=.* differs from init="):
        FathomSampler(init=INIT, bounds=BOUNDS, config=FathomConfig(init=HParams(0.2, 1.0, 20.0)))
    with pytest.raises(ValueError, match="FathomConfig.gamma_learning_rate"):
        FathomSampler(init=INIT, bounds=BOUNDS, config=FathomConfig(gamma_learning_rate=-1.0))
    same = FathomSampler(init=INIT, bounds=BOUNDS, config=FathomConfig(init=INIT, bounds=BOUNDS))
    assert same.config == FathomConfig(init=INIT, bounds=BOUNDS)


# --------------------------------------------------------------------------- divergence and failures


def test_divergence_halves_the_learning_rate_from_the_diverged_round():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    run_rounds(study, sampler, 3)
    trial = study.ask()
    diverged = sampler.suggest(trial)
    report_divergence(trial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns about the NaN value
        study.tell(trial, float("nan"))  # a NaN loss: Optuna stores FAIL
    assert study.trials[-1].state == TrialState.FAIL
    assert study.trials[-1].user_attrs[DIVERGED_ATTR] is True

    # again: a quarter; told FAIL explicitly this time
    trial = study.ask()
    retry = sampler.suggest(trial)
    assert retry.learning_rate == pytest.approx(diverged.learning_rate * DIVERGED_LR_FACTOR)
    assert (retry.local_epochs, retry.batch_size) == (diverged.local_epochs, diverged.batch_size)
    report_divergence(trial)
    study.tell(trial, state=TrialState.FAIL)

    trial = study.ask()
    good = sampler.suggest(trial)
    assert good.learning_rate == pytest.approx(diverged.learning_rate * DIVERGED_LR_FACTOR**2)
    report_round(trial, G=0.3, H=-0.2)
    study.tell(trial, 0.7)
    # and the EGN step goes on from the good round
    assert_hparams_close(sampler.next_hparams(study), expected_next(good, 0.3, -0.2))


def test_divergence_respects_the_lower_bound():
    sampler = FathomSampler(init=HParams(1.5e-3, 1.0, 20.0), bounds=BOUNDS)
    study = optuna.create_study(sampler=sampler)
    for _ in range(2):
        trial = study.ask()
        sampler.suggest(trial)
        report_divergence(trial)
        study.tell(trial, state=TrialState.FAIL)
    assert sampler.next_hparams(study).learning_rate == BOUNDS.lower.learning_rate


def test_failed_and_pruned_rounds_are_skipped():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    run_rounds(study, sampler, 2)
    before = sampler.next_hparams(study)
    for state in (TrialState.FAIL, TrialState.PRUNED):
        trial = study.ask()
        assert sampler.suggest(trial) == before
        study.tell(trial, state=state)
    running = study.ask()  # running trials are ignored too
    assert sampler.suggest(running) == before == sampler.next_hparams(study)


# --------------------------------------------------------------------------- other parameters


def test_other_parameters_go_to_a_seeded_random_sampler():
    def draws(seed):
        sampler = make_sampler(seed=seed)
        study = optuna.create_study(sampler=sampler)
        out = []
        for _ in range(5):
            trial = study.ask()
            sampler.suggest(trial)
            out.append(
                (trial.suggest_float("momentum", 0.0, 0.99), trial.suggest_int("layers", 1, 4))
            )
            report_round(trial, G=0.5, H=0.5)
            study.tell(trial, 1.0)
        return out

    assert draws(3) == draws(3) != draws(4)
    assert all(0.0 <= m <= 0.99 and 1 <= n <= 4 for m, n in draws(3))


def test_a_trial_distribution_narrower_than_the_bounds_is_respected():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    # the FATHOM value 0.1 lies outside [0.2, 0.5]: clipped into the trial's range
    assert trial.suggest_float("learning_rate", 0.2, 0.5, log=True) == 0.2
    with pytest.raises(ValueError, match="suggest it with trial.suggest_float"):
        sampler.sample_independent(study, trial, "batch_size", IntDistribution(1, 64))


def test_sample_relative_gives_python_floats_in_the_search_space():
    # the FATHOM counterpart of RelativeSamplerTestCase.test_sample_relative_numerical
    sampler = make_sampler()
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    trial = study.ask()
    sampler.suggest(trial)
    report_round(trial, G=-1.0, H=1.0)
    study.tell(trial, [0.5, 0.9])  # several objectives: values are never read
    frozen = study._storage.get_trial(study._storage.create_new_trial(study._study_id))
    space = sampler.infer_relative_search_space(study, frozen)
    params = sampler.sample_relative(study, frozen, space)
    assert set(params) == set(space) == {"learning_rate", "local_epochs", "batch_size"}
    for name, value in params.items():
        assert type(value) is float and space[name].low <= value <= space[name].high
    assert params["batch_size"] == pytest.approx(20.0 * math.exp(0.1))


# --------------------------------------------------------------------------- Optuna's contract suites


class _FathomFactory:
    @pytest.fixture
    def sampler(self):
        return lambda: make_sampler(seed=0)


class TestBasicSamplerContract(_FathomFactory, BasicSamplerTestCase):
    """Every parameter there is named x, y, z, ...: the random-sampler fallback."""


_ARBITRARY_NAMES = (
    "sample_relative() covers the three FATHOM names only; other names are sampled "
    "independently, so a relative search space of arbitrary names gets no relative values"
)


def _relative(sampler: FathomSampler, space: dict) -> dict:
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    return sampler.sample_relative(study, study._storage.get_trial(trial._trial_id), space)


class TestRelativeSamplerContract(_FathomFactory, RelativeSamplerTestCase):
    # Optuna's versions of these three expect relative values for arbitrary
    # names; sample_relative() covers the three FATHOM names only, and other
    # names are sampled independently. These check that instead.

    def test_sample_relative_numerical(self, sampler):
        space = {"x": FloatDistribution(-1.0, 1.0), "y": IntDistribution(0, 5)}
        assert _relative(sampler(), space) == {}
        lr = FloatDistribution(1e-3, 1.0, log=True)
        assert _relative(sampler(), {**space, "learning_rate": lr}) == {"learning_rate": 0.1}

    def test_sample_relative_categorical(self, sampler):
        space = {"c": CategoricalDistribution(["a", "b"])}
        assert _relative(sampler(), space) == {}

    def test_sample_relative_mixed(self, sampler):
        space = {
            "x": FloatDistribution(-1.0, 1.0),
            "c": CategoricalDistribution([1, 2]),
            "batch_size": FloatDistribution(1.0, 256.0, log=True),
        }
        assert _relative(sampler(), space) == {"batch_size": 20.0}


class TestMultiObjectiveSamplerContract(_FathomFactory, MultiObjectiveSamplerTestCase):
    """The sampler never reads objective values, so it allows several objectives."""


class TestSingleOnlySamplerContract(_FathomFactory, SingleOnlySamplerTestCase):
    def test_raise_error_for_samplers_during_multi_objectives(self, sampler):
        # Optuna's version expects a refusal. FathomSampler never reads
        # objective values, so a multi-objective study runs, and its next
        # round is the EGN step from G and H alone: B = 20 * exp(-0.1 * G).
        fathom = sampler()
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=fathom)
        trial = study.ask()
        assert fathom.suggest(trial) == INIT
        report_round(trial, G=1.0, H=0.0)
        study.tell(trial, [2.3, 0.1])
        assert fathom.suggest(study.ask()).batch_size == pytest.approx(20.0 * math.exp(-0.1))


# --------------------------------------------------------------------------- ask-and-tell example


def federated_quadratic_run(rounds: int, seed: int = 0):
    """A plain NumPy FedAvg loop on two clients (README-style example)."""
    rng = np.random.default_rng(seed)
    # client i's examples z; per-example loss 0.5 |x - z|^2
    clients = [rng.normal(1.0, 1.0, size=(40, 2)), rng.normal(-0.5, 1.0, size=(25, 2))]
    sampler = FathomSampler(
        init=HParams(learning_rate=0.05, local_epochs=1.0, batch_size=8.0),
        bounds=Bounds(lower=HParams(1e-3, 0.1, 1.0), upper=HParams(1.0, 10.0, 64.0)),
        seed=seed,
    )
    study = optuna.create_study(sampler=sampler, direction="minimize")
    x = np.zeros(2)
    server = ServerTracker.init(x, alpha=0.5)
    for _ in range(rounds):
        trial = study.ask()
        hp = sampler.suggest(trial)
        deltas, phis, sizes, losses = [], [], [], []
        for z in clients:
            steps, b = hp.local_steps(len(z)), hp.batch_int
            # every step takes exactly b examples: shuffle, and repeat the data as needed
            stream = np.concatenate(
                [rng.permutation(len(z)) for _ in range(-(-steps * b // len(z)))]
            )
            xk, tracker = x, ClientTracker.init(x)
            for k in range(steps):
                batch = z[stream[k * b : (k + 1) * b]]
                g = xk - batch.mean(axis=0)
                losses.append(0.5 * np.mean(np.sum((xk - batch) ** 2, axis=1)))
                xk = xk - hp.learning_rate * g
                tracker = tracker.update(g, xk)
            deltas.append(x - xk)
            phis.append(tracker.phi)
            sizes.append(len(z))
        u, G = aggregate_round(deltas, phis, sizes)
        H, server = server.update(u)
        x = x - np.asarray(u)
        report_round(trial, G=G, H=H)
        study.tell(trial, float(np.mean(losses)))
    return study, x, np.concatenate(clients).mean(axis=0)


def test_ask_and_tell_example_runs():
    study, x, optimum = federated_quadratic_run(rounds=25)
    trials = study.trials
    assert len(trials) == 25 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(G_ATTR in t.user_attrs and H_ATTR in t.user_attrs for t in trials)
    assert trials[0].user_attrs[H_ATTR] == 0.0  # m = 0 in round 1
    assert len({t.params["batch_size"] for t in trials}) == 25  # the schedule moves
    assert np.linalg.norm(x - optimum) < 0.5


# --------------------------------------------------------------------------- the sampler's cache


def _mixed_rounds(study: optuna.Study, sampler: FathomSampler, n: int, seen: list) -> None:
    """Rounds of every kind a study can hold, each suggestion recorded in ``seen``."""
    for k in range(n):
        trial = study.ask()
        hp = sampler.suggest(trial)
        seen.append(hp)
        kind = k % 6
        if kind == 1:  # diverged
            report_divergence(trial)
            study.tell(trial, state=TrialState.FAIL)
        elif kind == 2:  # failed for another reason: skipped
            study.tell(trial, state=TrialState.FAIL)
        elif kind == 3:  # told without hypergradients: rejected
            with pytest.raises(ValueError):
                study.tell(trial, 1.0)
        elif kind == 4:  # a trial that is not a round (another parameter only)
            other = study.ask()
            other.suggest_float("x", 0.0, 1.0)
            study.tell(other, 0.0)
            G, H = fake_hypergradients(hp, trial.number)
            report_round(trial, G=G, H=H)
            study.tell(trial, 1.0)
        else:
            G, H = fake_hypergradients(hp, trial.number)
            report_round(trial, G=G, H=H)
            study.tell(trial, 1.0)


def test_cached_suggestions_equal_a_fresh_sampler_reading_the_whole_study():
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    seen = []
    _mixed_rounds(study, sampler, 40, seen)
    # A fresh sampler derives every suggestion from the whole study: replay the study's
    # prefixes one by one and compare with what the cached sampler suggested then.
    trials = study.get_trials(deepcopy=False)
    rounds = [t for t in trials if "learning_rate" in t.params]
    assert len(rounds) == 40
    for k, trial in enumerate(rounds):
        prefix = optuna.create_study(sampler=make_sampler())
        prefix.add_trials([t for t in trials if t.number < trial.number and t.state.is_finished()])
        assert make_sampler().next_hparams(prefix) == seen[k], k


def test_a_suggestion_reads_no_trial_while_the_cache_is_current(monkeypatch):
    sampler = make_sampler()
    study = optuna.create_study(sampler=sampler)
    run_rounds(study, sampler, 5)
    calls = {"following": 0, "get_trials": 0}
    real_following, real_get_trials = FathomSampler.following, optuna.Study.get_trials

    def following(self, trial):
        calls["following"] += 1
        return real_following(self, trial)

    def get_trials(self, *args, **kwargs):
        calls["get_trials"] += 1
        return real_get_trials(self, *args, **kwargs)

    monkeypatch.setattr(FathomSampler, "following", following)
    monkeypatch.setattr(optuna.Study, "get_trials", get_trials)
    for n in (10, 200):
        run_rounds(study, sampler, n - len(study.trials))
        before = dict(calls)
        run_rounds(study, sampler, 1)  # one ask, suggest and tell
        # the told round is read once (at tell), whatever the study's size
        assert calls["following"] - before["following"] == 1
        assert calls["get_trials"] == before["get_trials"]


def test_rounds_written_by_another_sampler_are_noticed(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    mine, theirs = make_sampler(), make_sampler()
    study = optuna.create_study(storage=url, study_name="s", sampler=mine)
    run_rounds(study, mine, 3)
    other = optuna.load_study(storage=url, study_name="s", sampler=theirs)
    run_rounds(other, theirs, 2)  # the cached sampler did not see these
    expected = make_sampler().next_hparams(optuna.load_study(storage=url, study_name="s"))
    assert mine.next_hparams(study) == expected
    assert expected != mine.following(study.trials[2])  # the count told it to read again


@pytest.mark.parametrize("gamma_zero", [False, True])
def test_after_equals_following_of_the_rounds_trial(gamma_zero):
    """FathomSampler.after(used, G, H) is what following() derives from the trial that
    records the round, over many rounds, bounds reached, and diverged rounds."""
    config = FathomConfig(gamma_local_epochs=0.0) if gamma_zero else None
    sampler = make_sampler(config=config)
    study = optuna.create_study(sampler=sampler)
    rng = np.random.default_rng(3)
    hp = INIT
    for number in range(60):
        trial = study.ask()
        hp = sampler.suggest(trial)
        diverged = number % 17 == 5
        G, H = (float(v) for v in rng.uniform(-1, 1, 2) * (30 if number % 11 == 0 else 1))
        G, H = max(min(G, 1.0), -1.0), max(min(H, 1.0), -1.0)
        if diverged:
            report_divergence(trial)
            study.tell(trial, state=TrialState.FAIL)
            expected = sampler.after(hp, diverged=True)
        else:
            report_round(trial, G=G, H=H)
            study.tell(trial, 1.0)
            expected = sampler.after(hp, G=G, H=H)
        assert sampler.following(study.trials[-1]) == expected
        assert sampler.next_hparams(study) == expected
    assert expected != INIT
