"""Run by tests/test_sharding.py in a process with four forced XLA:CPU devices.

Trains the same rounds on one device and on four and prints, as JSON, the
largest differences and where the arrays lived.
"""

import json
import os
import sys

# the repository root before tests/ (whose baselines/ and studies/ would shadow the packages)
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _toy import flat, toy_task  # noqa: E402

from fathom_tune import HParams  # noqa: E402
from fathom_tune.engine import Engine  # noqa: E402
from fathom_tune.fathom import LocalAgreement  # noqa: E402
from fathom_tune.hparams import ClientHParams  # noqa: E402
from fathom_tune.peers import ClientRate, fedhyper_server, keep_update  # noqa: E402


def rounds(engine, hps):
    state = engine.init()
    results = []
    for hp in hps:
        state, res = engine.run_round(state, hp)
        results.append(res)
    return state, results


def compare(case, make, hps):
    one_state, one = rounds(make(1), hps)
    engine = make(4)
    four_state, four = rounds(engine, hps)
    out = {
        "devices": len(engine.devices),
        "client_block": engine.client_block,
        "resident": engine.resident,
        "param_devices": min(len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(four_state.params)),
        "params": float(np.max(np.abs(flat(one_state.params) - flat(four_state.params)))),
        "scale": float(np.max(np.abs(flat(one_state.params)))),
        "steps_equal": all(np.array_equal(a.local_steps, b.local_steps) for a, b in zip(one, four)),
        "loss": max(abs(a.train_loss - b.train_loss) for a, b in zip(one, four)),
    }
    if one[0].statistic is not None:
        out["statistic"] = float(max(np.max(np.abs(a.statistic - b.statistic)) for a, b in zip(one, four)))
    if one[0].validation_before is not None:
        out["validation"] = float(max(
            np.max(np.abs(a.validation_after - b.validation_after)) + np.max(np.abs(a.validation_before - b.validation_before))
            for a, b in zip(one, four)
        ))
    if one[0].local_rate is not None:
        out["local_rate"] = float(max(np.max(np.abs(a.local_rate - b.local_rate)) for a, b in zip(one, four)))
        out["rate_moved"] = float(max(np.max(np.abs(a.local_rate - 1.0)) for a in one))
    out["evaluate"] = abs(make(4).evaluate(four_state.params)["accuracy"] - make(1).evaluate(four_state.params)["accuracy"])
    return case, out


def main():
    assert len(jax.local_devices()) == 4, jax.local_devices()
    task = toy_task(clients_per_round=6)  # 6 clients on 4 devices: two padding clients
    hps = [HParams(0.2, 1.0, 7.0), HParams(0.1, 2.0, 12.0), HParams(0.3, 0.5, 5.0)]
    cases = dict([
        compare("resident", lambda d: Engine(task, seed=1, devices=d, client_statistic=LocalAgreement()), hps),
        compare(
            "host",
            lambda d: Engine(task, seed=1, devices=d, client_block=d, resident_bytes=1,
                             client_statistic=LocalAgreement()),
            hps,
        ),
    ])
    full = keep_update(fedhyper_server())
    cases.update([compare(
        "local_rate",
        lambda d: Engine(task, seed=3, devices=d, server_optimizer=full, local_rate=ClientRate(clients=6)),
        [HParams(1.5, 2.0, 5.0)] * 3,
    )])
    rng = np.random.default_rng(0)
    per_client = []
    for _ in range(3):
        own = tuple(HParams(float(rng.choice([0.05, 0.2])), float(rng.choice([0.5, 2.0])), float(rng.choice([4.0, 6.0])))
                    for _ in range(6))
        per_client.append(ClientHParams(clients=own, summary=own[0]))
    cases.update([compare(
        "per_client", lambda d: Engine(task, seed=2, devices=d, client_validation=0.2), per_client
    )])
    try:
        Engine(task, devices=4, client_block=6)
    except ValueError as e:
        cases["block_error"] = str(e)
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
