"""A minimal jit-compiled optax loop for the example language models (`jattn demo gpt`).

AdamW with a linear warmup and cosine decay, gradients clipped by global norm, weight decay on
matrices only; batches from `jattn.examples.text.TextCorpus.batch(seed, step)`. The repository's
`models/training.py` is the full loop (orbax checkpoints, resuming, metrics files).
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jattn.examples import gpt
from jattn.examples.text import TextCorpus


@dataclasses.dataclass(frozen=True)
class LMTraining:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    log_every: int = 25  # a history line (loss, tokens/s) every this many steps
    eval_every: int = 100  # validation loss every this many steps (and at the end)
    eval_batches: int = 4
    seed: int = 0


def train_language_model(
    model: nnx.Module, corpus: TextCorpus, settings: LMTraining, *, progress: bool = True
) -> list[dict]:
    """Trains `model` (tokens `[B, T]` -> logits) in place on next-token prediction; returns
    the history: {step, loss, tokens_per_s} every `log_every` steps, {step, val_loss} every
    `eval_every` steps and at the end."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        settings.learning_rate,
        settings.warmup_steps,
        max(settings.steps, settings.warmup_steps + 1),
        settings.learning_rate * 0.1,
    )
    decays = lambda tree: jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree)
    optimizer = optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adamw(schedule, weight_decay=settings.weight_decay, mask=decays),
    )
    opt_state = optimizer.init(params)

    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        return gpt.next_token_loss(nnx.merge(graphdef, params, rest), tokens)

    @jax.jit
    def step_fn(params, opt_state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    evaluate = jax.jit(loss)
    eval_batches = [
        corpus.batch("valid", settings.seed, i, settings.batch_size, settings.seq_len)
        for i in range(settings.eval_batches)
    ]
    history: list[dict] = []
    start, steps_since = time.perf_counter(), 0
    for step in tqdm(range(1, settings.steps + 1), disable=not progress, desc="train"):
        tokens = corpus.batch("train", settings.seed, step, settings.batch_size, settings.seq_len)
        params, opt_state, value = step_fn(params, opt_state, tokens)
        steps_since += 1
        if step % settings.log_every == 0 or step == settings.steps:
            value = float(value)  # waits for the step
            elapsed = time.perf_counter() - start
            rate = steps_since * settings.batch_size * settings.seq_len / elapsed
            history.append(dict(step=step, loss=value, tokens_per_s=rate))
            start, steps_since = time.perf_counter(), 0
        if step % settings.eval_every == 0 or step == settings.steps:
            val = np.mean([float(evaluate(params, batch)) for batch in eval_batches])
            history.append(dict(step=step, val_loss=float(val)))
            start = time.perf_counter()  # evaluation time is not training throughput
    nnx.update(model, params)
    return history
