"""The ServerApp: FedAvg on digits with FATHOM tuning eta, E and B every round.

Each round is a trial of the Optuna study ``digits/fathom-flower/seed<k>``
in the run config's ``storage``; the server evaluates on the validation
writers every ``eval-every`` rounds and on the test writers at the end.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import fathom_tune  # before fedjax
from fathom_flower.task import model_template, optional_path, storage_from_config, task_from_config
from fathom_tune import flower as ff

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the rounds of the run config (the rest of them after a resume)."""
    log = logging.getLogger("fathom_tune")
    if not logging.getLogger().handlers:  # a ServerApp process: show FATHOM's log of each round
        logging.basicConfig(format="%(message)s")
        log.setLevel(logging.INFO)
    cfg = context.run_config
    task = task_from_config(context)
    seed = int(cfg["seed"])
    engine = fathom_tune.Engine(task, seed=seed)  # the initial model and the evaluation
    template = model_template(task)

    def metrics(arrays: ArrayRecord, split: str) -> dict[str, float]:
        return engine.evaluate(ff.from_array_record(arrays, template), split)

    round_dir = optional_path(context, "round-dir")
    if round_dir is not None:
        round_dir.mkdir(parents=True, exist_ok=True)

    strategy = ff.FathomFedAvg.for_task(
        task,
        seed=seed,
        storage=storage_from_config(context),
        study_name=str(cfg["study-name"]) or None,
        eval_every=int(cfg["eval-every"]),
        checkpoint=optional_path(context, "checkpoint"),
        test_fn=lambda arrays: metrics(arrays, "test"),
        on_round=None
        if round_dir is None
        else lambda r: r.save(round_dir / f"round{r.round:05d}.npz"),
        node_wait=float(cfg["node-wait"]),
        fraction_train=float(cfg["fraction-train"]),
        min_train_nodes=int(cfg["min-train-nodes"]),
        min_available_nodes=int(cfg["min-available-nodes"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=ff.to_array_record(engine.init().params),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        evaluate_fn=lambda server_round, arrays: MetricRecord(metrics(arrays, "validation")),
    )
    outcome = strategy.study.user_attrs
    log.info(
        "study %r: validation %s, test %s, next hyperparameters %s",
        strategy.study.study_name,
        outcome.get("validation"),
        outcome.get("test"),
        outcome.get("hparams"),
    )
