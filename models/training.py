"""The training loop every model script shares: optax AdamW, orbax checkpoints, JSON-lines metrics.

- Optimiser: gradient clipping by global norm, then AdamW with a linear warmup + cosine decay
  schedule and a weight-decay mask, the official ToST LM's rule (`configure_optimizers` in
  `tost_lang/model_TSSA.py`): a parameter decays iff it has ndim >= 2 and no name on its path
  contains `temp` or `denom`; so TSSA temperatures and the causal `denom_bias` never decay, nor
  do biases, norm scales and LayerScale (a leaf named `bias` never decays: jattn's head-shaped
  projection biases are [N, H]). The same mask as `jattn.nn.weight_decay_mask`.
- State: the model's parameters as a pure dict, split from the NNX module, and the optax state.
  One jit-compiled step updates both.
- Checkpoints: orbax `CheckpointManager` under `<workdir>/checkpoints` every `checkpoint_every`
  steps, at the end, and when the run is interrupted (SIGINT: Ctrl-C; SIGTERM: what preemptible
  machines send first), after the step in flight. Starting again with the same workdir resumes
  from the newest one; batches are a function of (seed, step), so a resumed run ends bit for bit
  where an uninterrupted one does (tests/test_train.py kills a run and checks). A resume must
  agree on what defines the run (model, data, optimiser: `RUN_DEFINING_TRAIN_FIELDS`); logging
  and checkpoint intervals may change, and `steps` may grow (the cosine decay is then stretched
  from the resumed step on).
- Metrics: one JSON object per line in `<workdir>/metrics.jsonl` (step, loss, lr, grad_norm,
  tokens/s, evaluation results); a resumed run first drops the lines past its checkpoint.
- Progress: a tqdm bar on stderr.
"""

import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

NO_DECAY_NAMES = ("bias", "scale")  # exact names
NO_DECAY_KEYWORDS = ("temp", "denom")  # anywhere in a name, as the official ToST LM excludes
# A run with `warmup_steps >= steps` would be all warmup: it warms up over this fraction instead.
SHORT_RUN_WARMUP_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at learning_rate * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100


def add_train_flags(parser, defaults: TrainConfig = TrainConfig()) -> None:
    """argparse flags for every TrainConfig field (each with --help text)."""
    helps = dict(
        steps="optimizer steps in total (a resumed run continues to this many: raise it to extend "
        "a finished run)",
        batch_size="sequences (or images) per step",
        learning_rate="peak AdamW learning rate, reached after the warmup",
        min_lr_ratio="final learning rate as a fraction of the peak (cosine decay)",
        warmup_steps="linear warmup steps from 0 to the peak learning rate (if this is --steps "
        f"or more: {SHORT_RUN_WARMUP_FRACTION:.0%}% of --steps)",  # argparse: %% is %
        weight_decay="AdamW decoupled weight decay on matrices (biases, norms, temperatures: none)",
        clip_norm="clip gradients to this global norm",
        seed="seed for initialisation and data order (runs are deterministic given it)",
        log_every="write a metrics line every this many steps",
        eval_every="evaluate every this many steps (and at the end)",
        checkpoint_every="save an orbax checkpoint every this many steps (and at the end, and "
        "on SIGINT/SIGTERM)",
    )
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{helps[field.name]} (default: {default})",
        )


# The TrainConfig fields a resumed run must share with the checkpoint (the optimiser and the
# batches); `steps` may grow, and the logging/evaluation/checkpoint intervals are free.
RUN_DEFINING_TRAIN_FIELDS = (
    "batch_size", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "clip_norm",
    "seed",
)  # fmt: skip


def warmup_steps(config: TrainConfig) -> int:
    """The warmup the schedule uses: `config.warmup_steps`, unless that is the whole run (or
    more), then `SHORT_RUN_WARMUP_FRACTION` of the steps."""
    if config.warmup_steps < config.steps:
        return config.warmup_steps
    return int(config.steps * SHORT_RUN_WARMUP_FRACTION)


def train_config_from_args(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: ndim >= 2, unless a name on the path is in
    NO_DECAY_NAMES or contains one of NO_DECAY_KEYWORDS (the official ToST LM's rule)."""

    def decays(path, leaf) -> bool:
        names = {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
        keyword = any(kw in name for kw in NO_DECAY_KEYWORDS for name in names)
        return jnp.ndim(leaf) >= 2 and not names & set(NO_DECAY_NAMES) and not keyword

    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps(config),
        decay_steps=max(config.steps, warmup_steps(config) + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate_schedule(config), weight_decay=config.weight_decay, mask=decay_mask
        ),
    )


class Merger:
    """Pure parameter dicts <-> the NNX module (so the jitted step sees plain pytrees).

    Only `nnx.Param`s are trained and checkpointed; other state (dropout RNG streams, which
    the models here leave at rate 0) is kept as it was at construction.
    """

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state, self.rest = nnx.split(model, nnx.Param, ...)

    def params(self) -> dict:
        return nnx.to_pure_dict(self.state)

    def __call__(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.state)  # a fresh copy to fill in
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest)


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    params: dict
    history: list[dict]  # the metrics lines written by this run
    start_step: int  # 0, or the checkpoint step this run resumed from


def _read_metrics(path: pathlib.Path, up_to_step: int) -> list[str]:
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if json.loads(line).get("step", 0) <= up_to_step]


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def run_differences(saved: dict, settings: dict) -> list[str]:
    """What defines the run (model, data, optimiser) and differs between the saved settings and
    these, as `name: saved -> now` lines. Steps and the logging intervals are not compared."""
    free = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    free -= {f"train.{name}" for name in RUN_DEFINING_TRAIN_FIELDS}
    saved, now = _flatten(saved), _flatten(json.loads(json.dumps(settings)))
    return [
        f"{name}: {saved.get(name, '(not set)')!r} -> {now.get(name, '(not set)')!r}"
        for name in sorted(set(saved) | set(now))
        if name not in free and saved.get(name) != now.get(name)
    ]


class ResumeError(ValueError):
    """The workdir holds a run this one cannot continue (other settings, or past --steps)."""


class Interrupted(SystemExit):
    """Raised by `train` after it saved a checkpoint on SIGINT/SIGTERM; the exit status is the
    shell's for that signal (128 + its number), so an uncaught one ends the script like it."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class _StopOnSignal:
    """Within the `with`: SIGINT/SIGTERM set `signum` instead of stopping the process (a second
    one stops it as before). Does nothing off the main thread (Python handles signals there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def train(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    get_batch: Callable[[int], Any],
    config: TrainConfig,
    workdir: str | pathlib.Path,
    *,
    evaluate: Callable[[nnx.Module], dict] | None = None,
    items_per_batch: int | None = None,  # tokens (or images) per batch, for the throughput
    run_info: dict | None = None,  # model/data settings; a resume must match them
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train `model` to `config.steps`, resuming from `workdir`'s newest checkpoint if any.

    `loss_fn(model, batch)` is the scalar loss; `get_batch(step)` the batch of that step (a pure
    function of the step: that is what makes resuming exact); `evaluate(model)` returns a dict
    of metrics (run every `eval_every` steps and at the end). On SIGINT or SIGTERM it finishes
    the step in flight, saves a checkpoint and raises `Interrupted`.
    """
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(train=dataclasses.asdict(config), **(run_info or {}))
    settings_path = workdir / "config.json"
    merger = Merger(model)
    params = merger.params()
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    checkpoints = workdir / "checkpoints"
    manager = ocp.CheckpointManager(
        checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    start = 0
    if resume and manager.latest_step() is not None:
        saved = json.loads(settings_path.read_text()) if settings_path.exists() else None
        differences = run_differences(saved, settings) if saved is not None else []
        if differences:
            raise ResumeError(
                f"{workdir} holds a run with other settings ({'; '.join(differences)}); "
                "use a new --workdir, --no-resume, or the saved value"
            )
        start = manager.latest_step()
        if start > config.steps:
            raise ResumeError(
                f"{workdir} holds a checkpoint at step {start}, past --steps {config.steps}; "
                f"pass --steps {start} or more to resume it"
            )
        print(f"resuming from step {start} ({checkpoints})", flush=True)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, dict(params=params, opt=opt_state))
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
        params, opt_state = restored["params"], restored["opt"]
    elif resume:
        print(f"no checkpoint in {checkpoints}, starting fresh", flush=True)
    if config.checkpoint_every > config.steps - start:
        print(
            f"warning: --checkpoint-every {config.checkpoint_every} is more than the "
            f"{config.steps - start} steps to run: the only checkpoints will be the final one "
            "and one on SIGINT/SIGTERM",
            file=sys.stderr,
            flush=True,
        )
    if warmup_steps(config) != config.warmup_steps:
        print(
            f"note: --warmup-steps {config.warmup_steps} is not less than --steps "
            f"{config.steps}: warming up over {warmup_steps(config)} steps instead",
            file=sys.stderr,
            flush=True,
        )
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    metrics_path = workdir / "metrics.jsonl"
    kept = _read_metrics(metrics_path, start) if start else []
    metrics_path.write_text("".join(line + "\n" for line in kept))
    schedule = learning_rate_schedule(config)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(merger(p), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    history: list[dict] = []

    def record(line: dict) -> None:
        history.append(line)
        with metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(dict(params=params, opt=opt_state)))

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train", unit="step")
    interval_start, interval_steps = time.perf_counter(), 0
    with _StopOnSignal() as stop:
        for step in range(start + 1, config.steps + 1):
            params, opt_state, loss, grad_norm = train_step(params, opt_state, get_batch(step))
            interval_steps += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                loss = float(loss)  # waits for the step
                elapsed = time.perf_counter() - interval_start
                line = dict(
                    step=step,
                    loss=loss,
                    lr=float(schedule(step - 1)),
                    grad_norm=float(grad_norm),
                    steps_per_s=interval_steps / elapsed,
                )
                if items_per_batch:
                    line["items_per_s"] = items_per_batch * interval_steps / elapsed
                record(line)
                bar.set_postfix(loss=f"{loss:.3f}")
                interval_start, interval_steps = time.perf_counter(), 0
            if evaluate is not None and (step % config.eval_every == 0 or step == config.steps):
                record(dict(step=step, **evaluate(merger(params))))
                interval_start = time.perf_counter()  # evaluation time is not throughput
            stopping = stop.signum is not None and step < config.steps
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                save(step)
            if stopping:
                bar.close()
                manager.wait_until_finished()
                manager.close()
                name = signal.Signals(stop.signum).name
                print(
                    f"{name}: stopped after step {step}, checkpoint saved in {checkpoints}; "
                    "run the same command again to resume",
                    file=sys.stderr,
                    flush=True,
                )
                raise Interrupted(stop.signum, step)
        bar.close()
        manager.wait_until_finished()
        manager.close()
    return TrainResult(merger(params), params, history, start)


def tree_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )
