"""What one FathomSampler suggestion costs as the study grows, against reading the whole study.

Run: python -m pytest tests/benchmarks/test_sampler_speed.py -o addopts=""

``cached``: the sampler that told the study's rounds suggests again (it reads
only trials added since its last suggestion). ``whole study``: a new sampler
on the same study, which reads every finished trial once: what every
suggestion cost before the sampler kept its decisions. In memory.
"""

import optuna
import pytest

from fathom_tune import Bounds, FathomSampler, HParams, report_round

optuna.logging.set_verbosity(optuna.logging.WARNING)
INIT, BOUNDS = HParams(0.1, 1.0, 20.0), Bounds(HParams(1e-3, 0.1, 1.0), HParams(1.0, 10.0, 256.0))


def _study(rounds: int):
    sampler = FathomSampler(init=INIT, bounds=BOUNDS)
    study = optuna.create_study(sampler=sampler)
    for _ in range(rounds):
        trial = study.ask()
        sampler.suggest(trial)
        report_round(trial, G=0.1, H=0.2)
        study.tell(trial, 1.0)
    return sampler, study


@pytest.mark.parametrize("rounds", [100, 5000])
@pytest.mark.parametrize("how", ["cached", "whole study"])
def test_next_hparams(benchmark, rounds, how):
    sampler, study = _study(rounds)
    benchmark.group = f"FathomSampler.next_hparams, {rounds} rounds"
    if how == "cached":
        expected = sampler.next_hparams(study)
        got = benchmark(sampler.next_hparams, study)
    else:
        expected = sampler.next_hparams(study)
        got = benchmark(lambda: FathomSampler(init=INIT, bounds=BOUNDS).next_hparams(study))
    assert got == expected
