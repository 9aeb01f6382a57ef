import pandas as pd

import fathom_tune
from studies.paper_claims import starts, summarize


def test_summary_cells_by_hand():
    raw = pd.DataFrame(
        {
            "task": ["t"] * 6,
            "start": ["default"] * 6,
            "tuner": ["fathom", "fathom", "fathom", "fedavg", "fedavg", "fedavg"],
            "seed": [0, 1, 2, 0, 1, 2],
            "rounds_to_target": [10, 20, 30, None, 40, None],
        }
    )
    table = summarize(raw)
    row = table.iloc[0]
    # fathom: mean 20, sample sd sqrt(((10-20)^2 + 0 + (30-20)^2) / 2) = 10
    assert row["fathom"] == "20.0 ± 10.0 (3/3)"
    # fedavg: one seed reached it (40), the sd of one value is reported as 0
    assert row["fedavg"] == "40.0 ± 0.0 (1/3)"


def test_starts_follow_the_paper_relative_to_the_task_default():
    task = fathom_tune.tasks.synthetic(num_clients=4)
    s = starts(task)
    d = task.init_hparams
    assert s["default"] == d
    assert s["low lr (eta/2)"].learning_rate == d.learning_rate / 2
    assert s["B=4"].batch_size == 4.0 and s["B=256"].batch_size == 256.0
    assert s["B=4"].local_epochs == d.local_epochs
