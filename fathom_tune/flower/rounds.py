"""One FATHOM round of a Flower run as data: what the server received and what it computed.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
forms its hypergradients from the clients' replies of a round. A
:class:`RoundReport` holds that round whole (the model sent, every reply,
``u``, ``G``, ``H`` and the hyperparameters) so that a run can be audited or
its hypergradients recomputed independently. :class:`FathomFedAvg` passes one
to its ``on_round`` callback; :meth:`RoundReport.save` writes it to an
``.npz`` file (no pickle) and :meth:`RoundReport.load` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from fathom_tune.hparams import HParams

__all__ = ["RoundReport"]

_META = "__meta__"


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """A finished round of :class:`~fathom_tune.flower.FathomFedAvg`.

    Attributes:
        round: the round's 0-based index in the run.
        trial: the number of the round's Optuna trial.
        hparams: the ``(eta, E, B)`` the round used.
        x0: the model sent to the clients, ``{name: array}``.
        node_ids: the replying nodes, in reply order.
        client_params: each reply's model ``x_{K_i}``, in reply order.
        phis, num_examples, train_losses, local_steps: each reply's metrics.
        update: ``u``, the example-weighted mean of ``x0 - x_{K_i}``.
        G: the local hypergradient.
        H: the global hypergradient (NaN for a diverged round).
        train_loss: the example-weighted mean of the clients' losses.
        diverged: the round's loss or update was not finite; its model was
            discarded.
    """

    round: int
    trial: int
    hparams: HParams
    x0: dict
    node_ids: tuple[int, ...]
    client_params: tuple[dict, ...]
    phis: np.ndarray
    num_examples: np.ndarray
    train_losses: np.ndarray
    local_steps: np.ndarray
    update: dict
    G: float
    H: float
    train_loss: float
    diverged: bool

    @classmethod
    def of(
        cls, index: int, trial: int, hparams: HParams, x0: dict, replies, agg, H: float
    ) -> RoundReport:
        """The report of a round from its :class:`~fathom_tune.flower.server.Replies` and
        :class:`~fathom_tune.flower.server.Aggregate`."""
        return cls(
            round=index,
            trial=trial,
            hparams=hparams,
            x0=x0,
            node_ids=replies.node_ids,
            client_params=replies.params,
            phis=replies.phis,
            num_examples=replies.num_examples,
            train_losses=replies.train_losses,
            local_steps=replies.local_steps,
            update=agg.update,
            G=agg.G,
            H=H,
            train_loss=agg.train_loss,
            diverged=not agg.finite,
        )

    def save(self, path) -> pathlib.Path:
        """Writes the report to ``path`` (an ``.npz`` file; its directory must exist)."""
        path = pathlib.Path(path)
        meta = {
            "round": self.round,
            "trial": self.trial,
            "hparams": self.hparams.as_dict(),
            "node_ids": [int(n) for n in self.node_ids],
            "G": self.G,
            "H": self.H,
            "train_loss": self.train_loss,
            "diverged": self.diverged,
            "names": sorted(self.x0),
        }
        arrays = {_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for name in meta["names"]:
            arrays[f"x0/{name}"] = np.asarray(self.x0[name])
            arrays[f"update/{name}"] = np.asarray(self.update[name])
            for i, params in enumerate(self.client_params):
                arrays[f"client{i}/{name}"] = np.asarray(params[name])
        for field in ("phis", "num_examples", "train_losses", "local_steps"):
            arrays[field] = np.asarray(getattr(self, field))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> RoundReport:
        """Reads a report written by :meth:`save`."""
        with np.load(pathlib.Path(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode())
        names = meta["names"]
        num_clients = len(meta["node_ids"])
        return cls(
            round=meta["round"],
            trial=meta["trial"],
            hparams=HParams(**meta["hparams"]),
            x0={n: arrays[f"x0/{n}"] for n in names},
            node_ids=tuple(meta["node_ids"]),
            client_params=tuple(
                {n: arrays[f"client{i}/{n}"] for n in names} for i in range(num_clients)
            ),
            phis=arrays["phis"],
            num_examples=arrays["num_examples"],
            train_losses=arrays["train_losses"],
            local_steps=arrays["local_steps"],
            update={n: arrays[f"update/{n}"] for n in names},
            G=meta["G"],
            H=meta["H"],
            train_loss=meta["train_loss"],
            diverged=meta["diverged"],
        )
