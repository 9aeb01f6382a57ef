"""The ClientApp: FATHOM's local SGD on this SuperNode's digits, in JAX.

Every training message carries the round's ``(eta, E, B)``; the client runs
``K = max(ceil(E n / B_int), 1)`` SGD steps of exactly ``B_int`` examples
(shuffled and repeated as needed), compiled with ``jax.jit``, and replies
with its model, ``n``, ``phi``, its training loss and ``K``. Its data order
and random keys follow fathom_tune's engine, so with full participation a
Flower run reproduces ``fathom_tune.optimize`` on the same task and seed.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fathom_tune  # before fedjax
from fathom_flower.task import client_examples, client_index, model_template, task_from_config
from fathom_tune import flower as ff

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _local_sgd(task: fathom_tune.Task) -> ff.LocalSGD:
    # One compiled step per batch size, kept for every round this process serves.
    return ff.LocalSGD(ff.fedjax_grad_fn(task.model), jit=True)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FATHOM round on this node's training client."""
    task = task_from_config(context)
    index = client_index(task, context)
    seed = int(context.run_config["seed"])
    hparams, round_index = ff.read_train_config(msg.content["config"])
    params = ff.from_array_record(msg.content["arrays"], like=model_template(task))
    result = _local_sgd(task)(
        params,
        client_examples(task, index),
        hparams,
        rng=ff.client_generator(seed, round_index, index),
        key=ff.client_key(seed, round_index, index),
    )
    return Message(content=ff.train_reply(result), reply_to=msg)
