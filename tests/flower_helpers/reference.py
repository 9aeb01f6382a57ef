"""FATHOM's server side written again in plain NumPy (float64), from the spec.

Independent of fathom_tune's code: from the clients' replies of each round
(models ``x_{K_i}``, ``phi_i``, ``n_i``) it forms

* ``u = sum_i w_i (x0 - x_i)``, ``G = sum_i w_i phi_i``, ``w_i = n_i / sum n``;
* ``H = cos(m, u)`` with the previous ``m`` (0 if a norm is 0), then
  ``m <- alpha m + (1 - alpha) u``;
* ``p = log(E, eta, B)``: ``log E += g_E (H + G)``, ``log eta += g_eta H``,
  ``log B -= g_B G``, clipped to the log bounds; a diverged round (loss or
  ``u`` not finite) keeps ``m`` and the model and halves ``eta``.
"""

from __future__ import annotations

import math

import numpy as np


def _flat(tree: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in sorted(tree)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def replay(reports, *, init, lower, upper, gamma, alpha):
    """Per round: ``{"hparams": (eta, E, B) used, "u", "G", "H", "diverged"}`` recomputed.

    Args:
        reports: the run's ``RoundReport`` objects in round order (only their
            ``x0``, ``client_params``, ``phis``, ``num_examples`` and
            ``train_losses`` are read).
        init, lower, upper: ``(eta, E, B)`` of the start and the bounds.
        gamma: ``(g_eta, g_E, g_B)``.
        alpha: the smoothing of ``m``.
    """
    names = ("learning_rate", "local_epochs", "batch_size")
    p = np.log(np.array(init, np.float64))
    lo, hi = np.log(np.array(lower, np.float64)), np.log(np.array(upper, np.float64))
    m = None
    out = []
    for r in reports:
        x0 = _flat(r.x0)
        m = np.zeros_like(x0) if m is None else m
        w = np.asarray(r.num_examples, np.float64) / np.sum(r.num_examples)
        u = sum(wi * (x0 - _flat(xi)) for wi, xi in zip(w, r.client_params))
        G = float(np.clip(w @ np.asarray(r.phis, np.float64), -1.0, 1.0))
        loss = float(w @ np.asarray(r.train_losses, np.float64))
        diverged = not (math.isfinite(loss) and np.isfinite(u).all())
        row = {"hparams": dict(zip(names, np.exp(p))), "u": u, "G": G, "diverged": diverged}
        if diverged:
            row["H"] = math.nan
            p = np.clip(p + np.array([math.log(0.5), 0.0, 0.0]), lo, hi)
        else:
            H = _cos(m, u)
            m = alpha * m + (1 - alpha) * u
            row["H"] = H
            step = np.array([gamma[0] * H, gamma[1] * (H + G), -gamma[2] * G])
            p = np.clip(p + step, lo, hi)
        out.append(row)
    return out, dict(zip(names, np.exp(p)))
