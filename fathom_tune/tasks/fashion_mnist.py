"""Fashion-MNIST split over clients by a Dirichlet label skew.

The data is Fashion-MNIST of H. Xiao, K. Rasul and R. Vollgraf,
"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv 1708.07747 (2017): 70,000 grey 28x28 images of Zalando
articles in 10 classes, 60,000 of them in the training file. It is read from
the four standard idx files (``train-images-idx3-ubyte`` and
``train-labels-idx1-ubyte``, gzipped or plain) as Debian's package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist/``;
the idx headers are parsed here, nothing is unpickled.

The clients are the usual label-skewed split of federated benchmarks
(T.-M. H. Hsu, H. Qi and M. Brown, arXiv 1909.06335; M. Yurochkin et al.,
ICML 2019): each class is divided among the clients by proportions drawn
from Dir(alpha), so a small ``alpha`` gives each client a few classes.

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 30)
    >>> parts = dirichlet_split(labels, 5, alpha=0.5, rng=np.random.default_rng(0))
    >>> len(parts), sorted(np.concatenate(parts).tolist()) == list(range(300))
    (5, True)
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task
from fathom_tune.tasks import _common
from fathom_tune.tasks.models import ready_model
from fathom_tune.tasks.own_data import holdout_clients

__all__ = ["DEFAULT_DIR", "ENV_VAR", "dirichlet_split", "fashion_mnist", "load_train", "read_idx"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist/"
ENV_VAR = "FATHOM_TUNE_FASHION_MNIST"
IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
NUM_CLASSES = 10
IMAGE_SIDE = 28
MAX_DRAWS = 1000
"""Draws of the Dirichlet split before :func:`dirichlet_split` gives up."""


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array stored in the idx file ``path`` (gzipped when it ends in ``.gz``).

    An idx file is a big-endian header, the magic number (two zero bytes,
    the type ``0x08`` for unsigned bytes, the number of dimensions ``d``),
    ``d`` dimensions as 32-bit unsigned ints, then the values row-major:
    2051 (``0x00000803``) for images ``[n, rows, cols]``, 2049
    (``0x00000801``) for labels ``[n]``.

    Args:
        path: the file.
        magic: the magic number the file must start with.

    Returns:
        The values, uint8, of the shape in the header.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: another magic number, a truncated header, values missing
            or left over, or a broken gzip stream; the message names the file
            and what was expected.

    Example:
        >>> read_idx("/nonexistent/train-labels-idx1-ubyte", LABELS_MAGIC)
        Traceback (most recent call last):
        ...
        FileNotFoundError: no idx file at '/nonexistent/train-labels-idx1-ubyte'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no idx file at {path!r}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path!r} is not a readable gzip file ({exc}); download it again"
        ) from exc
    ndim = magic & 0xFF
    expected = f"an idx file of magic number {magic} (0x{magic:08x}, uint8, {ndim} dimensions)"
    if len(data) < 4 + 4 * ndim:
        raise ValueError(
            f"{path!r} is {len(data)} bytes long, too short for the header of {expected}"
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path!r} starts with magic number {found} (0x{found:08x}); expected {expected}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    body = memoryview(data)[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(
            f"{path!r}: its header gives shape {shape}, {int(np.prod(shape))} values, but "
            f"{len(body)} bytes follow the header; expected {expected} with exactly that many"
        )
    return np.frombuffer(body, np.uint8).reshape(shape)


def data_dir_of(data_dir: str | os.PathLike | None) -> str:
    """``data_dir`` if given, else ``$FATHOM_TUNE_FASHION_MNIST`` if set, else the default."""
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a str, an os.PathLike or None, got {data_dir!r}")
        return os.fspath(data_dir)
    return os.environ.get(ENV_VAR) or DEFAULT_DIR


def _find(directory: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{name}.gz (or {name}) is not in the Fashion-MNIST directory {directory!r} (taken "
        f"from the data_dir argument, else ${ENV_VAR}, else {DEFAULT_DIR}). Install Debian's "
        f"package (apt-get install dataset-fashion-mnist), or pass data_dir= / set {ENV_VAR} "
        "to a directory holding the idx files of https://github.com/zalandoresearch/fashion-mnist"
    )


def load_train(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels of Fashion-MNIST.

    Args:
        data_dir: directory of the idx files; ``None``: ``$FATHOM_TUNE_FASHION_MNIST``,
            else :data:`DEFAULT_DIR`.

    Returns:
        ``x`` float32 ``[n, 28, 28, 1]`` in [0, 1] (the bytes / 255) and ``y``
        int32 ``[n]`` in 0..9; ``n`` is 60,000 for the real files.

    Raises:
        FileNotFoundError: a file is missing; the message names it, the
            directory and how to get the data.
        ValueError: a file is not an idx file of the right kind (see
            :func:`read_idx`), the images are not 28x28, the two files hold
            different numbers of examples, or a label is not in 0..9.

    Example:
        With ``dataset-fashion-mnist`` installed (``tests/tasks/test_fashion_mnist.py``
        checks what this prints on the installed data):

        >>> x, y = load_train()  # doctest: +SKIP
        >>> x.shape, x.dtype, float(x.max()), y[:5].tolist()  # doctest: +SKIP
        ((60000, 28, 28, 1), dtype('float32'), 1.0, [9, 0, 0, 3, 0])
    """
    directory = data_dir_of(data_dir)
    images_path, labels_path = _find(directory, IMAGES_FILE), _find(directory, LABELS_FILE)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{images_path!r} holds images of {images.shape[1]}x{images.shape[2]} pixels; "
            f"Fashion-MNIST's are {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path!r} holds {len(images)} images but {labels_path!r} {len(labels)} "
            "labels; expected one label per image"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(
            f"{labels_path!r} holds label {int(labels.max())}; expected labels 0..{NUM_CLASSES - 1}"
        )
    x = (images.astype(np.float32) / 255.0)[..., np.newaxis]
    return x, labels.astype(np.int32)


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 1,
) -> list[np.ndarray]:
    """Splits examples over clients by a Dirichlet label skew.

    One draw: for each class ``c = 0, 1, ...`` (up to the largest label) in
    turn, shuffle the indices of that class's examples (``rng.permutation``),
    draw proportions ``p ~ Dir(alpha * 1_num_clients)`` (``rng.dirichlet``)
    and give client ``k`` the shuffled indices from
    ``int(S_{k-1} n_c)`` to ``int(S_k n_c)``, where ``S_k = p_0 + ... + p_k``
    and ``n_c`` is the number of examples of class ``c`` (so client ``k``
    gets within one of ``p_k n_c``). Every example goes to exactly one
    client. A draw that leaves some client with fewer than ``min_examples``
    examples is thrown away and the split drawn again (the construction of
    Yurochkin et al. 2019), up to :data:`MAX_DRAWS` times.

    Args:
        labels: class index of each example, ints >= 0.
        num_clients: number of clients (>= 1).
        alpha: concentration of the Dirichlet (> 0); small: few classes per client.
        rng: the source of randomness.
        min_examples: fewest examples a client may get (>= 0).

    Returns:
        ``num_clients`` sorted int64 arrays of indices into ``labels``.

    Raises:
        ValueError: an argument is out of range, ``num_clients * min_examples``
            exceeds the examples, or :data:`MAX_DRAWS` draws all left a
            client short (the message says what to change).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> parts = dirichlet_split(np.arange(100) % 10, 4, alpha=100.0, rng=rng)
        >>> [len(p) for p in parts]
        [20, 25, 25, 30]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(
            f"labels must be a 1-d array of ints >= 0, got {labels.dtype} of shape {labels.shape}"
        )
    num_clients = checks.positive_int("num_clients", num_clients)
    alpha = checks.positive_finite("alpha", alpha)
    min_examples = checks.int_range("min_examples", min_examples, 0)
    if num_clients * min_examples > len(labels):
        raise ValueError(
            f"num_clients={num_clients} clients of at least min_examples={min_examples} need "
            f"{num_clients * min_examples} examples, but there are {len(labels)}"
        )
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max(initial=-1)) + 1)]
    for _ in range(MAX_DRAWS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            shuffled = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p) * len(shuffled)).astype(int)[:-1]
            for k, part in enumerate(np.split(shuffled, cuts)):
                pieces[k].append(part)
        parts = [np.sort(np.concatenate(ps)).astype(np.int64) for ps in pieces]
        if min(len(part) for part in parts) >= min_examples:
            return parts
    raise ValueError(
        f"{MAX_DRAWS} draws of Dir(alpha={alpha}) over num_clients={num_clients} clients all left "
        f"a client with fewer than min_examples={min_examples} of the {len(labels)} examples; "
        "use a larger alpha, more examples, fewer clients or a smaller min_examples"
    )


def fashion_mnist(
    *,
    data_dir: str | os.PathLike | None = None,
    num_examples: int | None = 6000,
    num_clients: int = 100,
    alpha: float = 0.5,
    seed: int = 0,
    min_examples: int = 10,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Task:
    """Fashion-MNIST over ``num_clients`` label-skewed clients, with the ready CNN.

    From ``numpy.random.default_rng(seed)``, in this order: ``num_examples``
    of the 60,000 training images are drawn without replacement (the first
    of a permutation, kept in file order; ``None``: all); they are split over
    the clients by :func:`dirichlet_split` (Dir(``alpha``), every client at
    least ``min_examples`` examples, by redrawing), client ``k`` named
    ``b"client007"``. Whole clients are then held out by
    :func:`fathom_tune.tasks.holdout_clients` with the same ``seed``:
    ``max(1, round(validation_fraction * num_clients))`` for validation,
    ``max(1, round(test_fraction * num_clients))`` for testing, the rest
    train. The 10,000 images of the ``t10k`` idx files are not used.

    Features: ``x`` float32 ``[n, 28, 28, 1]`` in [0, 1], ``y`` int32 in 0..9.
    Model: :func:`fathom_tune.tasks.ready_model` for 28x28x1 images, the small
    CNN (3x3 convolutions of 16 and 32 channels, each with 2x2 max pooling,
    dense 64), per-example cross-entropy; eval metrics ``loss``, ``accuracy``.

    Defaults (sized for a CPU; the start and protocol of
    :func:`~fathom_tune.tasks.emnist`): 6,000 examples over 100 clients
    (Dir(0.5), 10 validation and 10 test clients, 80 training clients of
    20 to 170 examples, median 56; 534 validation and 570 test examples),
    10 clients per round, 100 rounds, evaluation every 5 rounds, start
    ``learning_rate=0.1, local_epochs=1, batch_size=20``. Bounds: EMNIST's
    learning rate [1e-4, 0.5] and local epochs [0.01, 10]; batch size
    [1, 256]. One 100-round static FedAvg run,
    ``fathom_tune.fedavg(fathom_tune.tasks.fashion_mnist(), num_rounds=100)``,
    took 61 s and 94 s (44 to 48 s of CPU time; building the task 2 to 5 s)
    on a 2-core machine shared with other work; 12,000 examples took 159 s.

    Target: validation accuracy >= 0.75. Static FedAvg from the default start
    (seed 0 for the data and for training) first reaches it at round 70
    (0.764), is best at round 95 (0.773) and ends at 0.732 (test accuracy
    0.809); a good schedule reaches it sooner, a poor one late or never.

    Args:
        data_dir: directory of the idx files (see :func:`load_train`).
        num_examples: training images used (1..60,000); ``None``: all.
        num_clients: clients in all (>= 3: train, validation and test).
        alpha: Dirichlet concentration (> 0); small: each client holds few classes.
        seed: draws the examples, the split and the held-out clients.
        min_examples: fewest examples per client (>= 1).
        validation_fraction: share of the clients held out for validation, in (0, 1).
        test_fraction: share of the clients held out for testing, in (0, 1).

    Returns:
        The task.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, more examples are asked for
            than the files hold, or the files are not Fashion-MNIST's idx
            files (see :func:`load_train`).
        FileNotFoundError: a file is missing (the message says how to get it).

    Example:
        With ``dataset-fashion-mnist`` installed (``tests/tasks/test_fashion_mnist.py``
        checks what this prints on the installed data):

        >>> from fathom_tune.tasks import fashion_mnist
        >>> task = fashion_mnist(num_examples=2000, num_clients=20)  # doctest: +SKIP
        >>> [s.num_clients() for s in (task.train, task.validation, task.test)]  # doctest: +SKIP
        [16, 2, 2]
    """
    if num_examples is not None:
        num_examples = checks.positive_int("num_examples", num_examples)
    num_clients = checks.int_range("num_clients", num_clients, 3)
    alpha = checks.positive_finite("alpha", alpha)
    seed = checks.seed("seed", seed)
    min_examples = checks.positive_int("min_examples", min_examples)
    _common.holdout_counts(num_clients, validation_fraction, test_fraction)  # checks them early
    directory = data_dir_of(data_dir)

    x, y = load_train(directory)
    rng = np.random.default_rng(seed)
    if num_examples is None:
        num_examples = len(y)
    if num_examples > len(y):
        raise ValueError(
            f"num_examples={num_examples} but the training files in {directory!r} hold "
            f"{len(y)} examples; allowed: 1..{len(y)} or None (all)"
        )
    chosen = np.sort(rng.permutation(len(y))[:num_examples])
    x, y = x[chosen], y[chosen]
    parts = dirichlet_split(y, num_clients, alpha=alpha, rng=rng, min_examples=min_examples)
    clients = {b"client%03d" % k: {"x": x[idx], "y": y[idx]} for k, idx in enumerate(parts)}
    train, validation, test = holdout_clients(
        clients, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed
    )
    return Task(
        name="fashion-mnist",
        train=_common.in_memory(train),
        validation=_common.in_memory(validation),
        test=_common.in_memory(test),
        model=ready_model((IMAGE_SIDE, IMAGE_SIDE, 1), num_classes=NUM_CLASSES),
        clients_per_round=min(10, len(train)),
        num_rounds=100,
        eval_every=5,
        target=Target("accuracy", 0.75),
        init_hparams=HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0),
        bounds=Bounds(
            lower=HParams(learning_rate=1e-4, local_epochs=0.01, batch_size=1.0),
            upper=HParams(learning_rate=0.5, local_epochs=10.0, batch_size=256.0),
        ),
    )
