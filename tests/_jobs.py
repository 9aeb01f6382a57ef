"""Jobs that the reliability tests run in child processes (and kill).

``python tests/_jobs.py fathom <storage> <checkpoint> <num_rounds> <stall>``
runs a checkpointed FATHOM run on the toy task, writing its rounds and
checkpoint every 2 rounds; ``python tests/_jobs.py
baseline <storage> <checkpoint_dir> <worker> <budget_rounds> <stall>`` runs
one random-search worker on it. The job hangs at a known point where the
test kills it: FATHOM with ``stall`` = ``round`` inside round ``STALL_ROUND``,
with ``write`` after its rounds up to ``STALL_ROUND - 1`` were committed and
before their checkpoint (both touch ``<checkpoint>.stalled`` first);
a baseline with ``stall`` = 1 right after its first checkpoint. Toy rounds take
milliseconds, so a kill timed from outside would miss them. Baseline workers
wait 3 s between failing a stale trial and creating its retry, so that the
other workers act in that moment.
``python tests/_jobs.py stale <storage> <ready_file> <go_file>`` opens the
storage, touches ``ready_file``, waits for ``go_file`` and then, at the same
moment as its siblings, fails stale trials and asks for one trial, printing
its number.
"""

import pathlib
import signal
import sys
import time

import optuna

# Run as a script, tests/ comes first on the path, where tests/baselines/ and tests/studies/
# would shadow the packages of those names: the repository root goes before it.
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).parent)]
import fathom_tune.storage.checkpoint
from _toy import toy_task

import baselines
import fathom_tune
from fathom_tune.engine import Engine

optuna.logging.set_verbosity(optuna.logging.WARNING)

STALL_ROUND = 5

SPACE = fathom_tune.Bounds(fathom_tune.HParams(0.05, 0.5, 8.0), fathom_tune.HParams(1.0, 2.0, 16.0))
"""The workers' search space: batch sizes within two engine buckets, so few compilations."""


def _hang(*args, **kwargs):
    time.sleep(3600)


def short_toy():
    """The toy task with 8-round trials evaluated every 4 rounds."""
    return toy_task(num_rounds=8, eval_every=4)


def fathom(storage: str, checkpoint: str, num_rounds: str, stall: str) -> None:
    marker = pathlib.Path(checkpoint + ".stalled")
    if stall == "round":  # hang inside round STALL_ROUND (round STALL_ROUND - 1 not yet written)
        real = Engine.run_round

        def run_round(self, state, hparams):
            if state.round == STALL_ROUND:
                marker.touch()
                _hang()
            return real(self, state, hparams)

        Engine.run_round = run_round
    elif stall == "write":  # hang after rounds up to STALL_ROUND - 1 were committed, before their checkpoint
        real_save = fathom_tune.storage.checkpoint.save_run

        def save_run(path, *, progress, **kwargs):
            if progress.state.round >= STALL_ROUND - 1:
                marker.touch()
                _hang()
            return real_save(path, progress=progress, **kwargs)

        fathom_tune.storage.checkpoint.save_run = save_run
    fathom_tune.optimize(
        toy_task(),
        num_rounds=int(num_rounds),
        eval_every=2,
        storage=storage,
        checkpoint=checkpoint,
        checkpoint_every=2,
        flush_seconds=3600,
        progress=False,
    )


def baseline(
    storage: str, checkpoint_dir: str, worker: str, budget_rounds: str, stall: str
) -> None:
    if stall == "1":
        real = fathom_tune.storage.checkpoint.save_run

        def save_then_hang(*args, **kwargs):
            real(*args, **kwargs)
            _hang()

        fathom_tune.storage.checkpoint.save_run = save_then_hang
    # Widen the moment between a stale trial's FAIL and its retry's creation
    # (two transactions) so that other workers act inside it.
    real_retry = optuna.storages.RetryHeartbeatStaleTrialCallback.__call__

    def slow_retry(self, study, trial):
        time.sleep(3)
        real_retry(self, study, trial)

    optuna.storages.RetryHeartbeatStaleTrialCallback.__call__ = slow_retry
    baselines.run(
        short_toy(),
        "random",
        space=SPACE,
        budget_rounds=int(budget_rounds),
        storage=storage,
        worker=int(worker),
        checkpoint_dir=checkpoint_dir,
        heartbeat=(1, 3),
        progress=False,
    )


def stale(storage: str, ready_file: str, go_file: str) -> None:
    study = optuna.load_study(
        study_name="race", storage=fathom_tune.open_storage(storage, heartbeat=(1, 2))
    )
    pathlib.Path(ready_file).touch()
    go = pathlib.Path(go_file)
    while not go.exists():
        pass
    optuna.storages.fail_stale_trials(study)
    print(study.ask().number, flush=True)


# ---------------------------------------------------------- for the tests that run the jobs
def wait_until(predicate, proc, timeout: float = 300.0) -> None:
    """Waits for ``predicate()``; fails if the job ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended before the kill: {proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("job made no progress in time")
        time.sleep(0.1)


def kill(proc) -> None:
    """SIGKILLs the job ``proc`` and checks that the signal is what ended it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def trials_of(url: str, name: str):
    """The trials of study ``name`` (none if it does not exist yet), through a fresh connection."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        storage.engine.dispose()


if __name__ == "__main__":
    {"fathom": fathom, "baseline": baseline, "stale": stale}[sys.argv[1]](*sys.argv[2:])
