"""FedEx's inner loop: one FedAvg run whose clients each train with a sampled configuration.

"Federated Hyperparameter Tuning: Challenges, Baselines, and Connections to
Weight-Sharing" (M. Khodak, R. Tu, T. Li, L. Li, M.-F. Balcan, V. Smith,
A. Talwalkar, NeurIPS 2021, arXiv 2106.04502); reference code: ``hyper.py``
of the authors' FedEx repository (class ``FedEx``), and FederatedScope's
``autotune/fedex/server.py`` (``update_policy``), which has the same logic.

For each tuned hyperparameter ``i`` with candidates ``C_i`` (``n_i`` arms) the
server keeps logits ``z_i`` (uniform at the start, ``z_i = -log n_i``) and
``theta_i = exp(z_i)``. Every round each sampled client ``j`` draws an arm
``a_{j,i} ~ theta_i`` per hyperparameter and trains with that configuration;
it reports its validation loss before (``before_j``, the server model) and
after (``after_j``, its own model) local training on its held-out part, whose
size is its weight. With ``omega_j`` the normalised weights and
``s_j = after_j`` (``after_j - before_j`` with ``diff``):

* baseline ``lambda_t``: the discounted mean of the earlier rounds'
  ``R_tau = sum_j omega_j after_j`` (0 in the first round; discount 0: the
  last value, 1: the plain mean);
* gradient per arm: ``g_i[k] = sum_j omega_j (s_j - lambda_t) 1[a_{j,i} = k] / theta_i[k]``
  (:func:`arm_gradient`);
* step: ``z_i <- z_i - eta_{t,i} g_i``, ``eta_{t,i} = sqrt(2 log n_i) / D``
  with ``D = ||g_i||_inf`` ("aggressive", the authors' setting in their
  wrapped runs; 1 when ``g_i = 0``) or ``D = sqrt(t)`` ("auto",
  FederatedScope's default), then ``z_i <- z_i - logsumexp(z_i)``
  (:func:`exponentiated_step`).

The paper wraps this loop in a random search or successive halving over
server settings; on a fixed server optimizer (plain FedAvg) the inner loop
alone is the one-run method. The model returned is the run's final model;
the configuration reported is ``argmax theta``. The optional entropy cutoff:
once the distribution's entropy (:func:`entropy`, summed over the
hyperparameters) falls below a threshold after a round's step, exploration
stops for the rest of the run: every client trains with the argmax
configuration and the distribution stays as it is.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SCHEDULES",
    "arm_gradient",
    "discounted_sums",
    "entropy",
    "exponentiated_step",
    "logsumexp",
]

SCHEDULES = ("aggressive", "auto")
"""FedEx's step-size schedules (see :func:`exponentiated_step`)."""


def logsumexp(z) -> float:
    """``log sum exp z``, computed stably.

    >>> round(logsumexp([0.0, 0.0]), 6) == round(math.log(2), 6)
    True
    """
    z = np.asarray(z, np.float64)
    top = float(z.max())
    return top + math.log(float(np.exp(z - top).sum()))


def arm_gradient(arms, theta, omega, scores, baseline: float) -> np.ndarray:
    """FedEx's importance-weighted gradient of one hyperparameter's logits.

    Args:
        arms: the arm each client drew, ints in ``[0, n)``.
        theta: the arms' probabilities (``n``).
        omega: the clients' normalised weights.
        scores: the clients' ``s_j``.
        baseline: ``lambda_t``.

    Returns:
        ``g[k] = sum_j omega_j (s_j - baseline) 1[arms_j = k] / theta[k]``.

    Example:
        >>> arm_gradient([0, 1, 1], [0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 2.0, 0.0], 1.0).tolist()
        [0.0, -0.4]
    """
    arms = np.asarray(arms, np.int64)
    theta = np.asarray(theta, np.float64)
    contrib = np.asarray(omega, np.float64) * (np.asarray(scores, np.float64) - float(baseline))
    g = np.zeros(len(theta))
    np.add.at(g, arms, contrib)
    return g / theta


def exponentiated_step(z, g, t: int, schedule: str = "aggressive") -> np.ndarray:
    """One exponentiated-gradient step on logits ``z``, renormalised by logsumexp.

    Args:
        z: the logits (``log theta``).
        g: their gradient (:func:`arm_gradient`).
        t: the number of this update (1 for the first).
        schedule: ``"aggressive"`` (``D = max |g|``, 1 when ``g = 0``) or
            ``"auto"`` (``D = sqrt(t)``); the step is ``sqrt(2 log n) / D``.

    Example:
        >>> z = exponentiated_step(np.log([0.5, 0.5]), np.array([1.0, 0.0]), t=1)
        >>> np.exp(z).round(4).tolist()
        [0.2355, 0.7645]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    z = np.asarray(z, np.float64)
    g = np.asarray(g, np.float64)
    base = math.sqrt(2.0 * math.log(len(z)))
    if schedule == "aggressive":
        top = float(np.abs(g).max()) if len(g) else 0.0
        denominator = top if top > 0.0 else 1.0
    else:
        denominator = math.sqrt(t)
    z = z - base / denominator * g
    return z - logsumexp(z)


def discounted_sums(sums: tuple[float, float], value: float, discount: float) -> tuple[float, float]:
    """The running sums of the discounted mean after one more round's ``R``.

    ``sums = (numerator, denominator)``, ``(0, 0)`` before the first round; the
    baseline ``lambda_t`` is ``numerator / denominator`` (0 while it is 0):
    ``sum_tau discount^(t-1-tau) R_tau / sum_tau discount^(t-1-tau)``, so
    discount 0 gives the last value and 1 the plain mean.

    >>> s = discounted_sums(discounted_sums((0.0, 0.0), 1.0, 0.0), 3.0, 0.0)
    >>> s[0] / s[1]
    3.0
    >>> s = discounted_sums(discounted_sums((0.0, 0.0), 1.0, 1.0), 3.0, 1.0)
    >>> s[0] / s[1]
    2.0
    """
    numerator, denominator = sums
    return discount * numerator + value, discount * denominator + 1.0


def entropy(thetas) -> float:
    """The joint entropy (nats) of independent distributions: ``sum_i -sum_k theta_i[k] log theta_i[k]``.

    >>> round(entropy([[0.5, 0.5], [1.0, 0.0, 0.0]]), 6) == round(math.log(2), 6)
    True
    """
    total = 0.0
    for theta in thetas:
        p = np.asarray(theta, np.float64)
        p = p[p > 0]
        total += float(-(p * np.log(p)).sum())
    return total
