"""The optimizer and learning-rate schedule of :class:`~cm3leon_lightning.modules.cm3leon.CM3LeonModule`: AdamW with
decay on >=2-D weights only, a per-step warm-up/decay (:class:`~cm3leon_lightning.modules.schedule.WarmupDecay`)
whose length comes from the settings or the trainer, and this run's settings taken back over a resumed
checkpoint's. The module's ``configure_optimizers`` and ``on_train_start`` call these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cm3leon_lightning.model import param_groups
from cm3leon_lightning.modules.schedule import WarmupDecay

__all__ = [
    "adamw",
    "check_optimizer_args",
    "optimizer_settings",
    "reapply_optimizer_settings",
    "schedule_length",
    "warmup_decay_scheduler",
]

# The per-group settings of this run that a resumed optimizer's state would otherwise replace.
SETTINGS_KEYS = ("initial_lr", "betas", "eps", "weight_decay")


def check_optimizer_args(
    lr: float,
    warmup_steps: int,
    lr_decay: str,
    min_lr_ratio: float,
    decay_steps: int | None,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """Raise ValueError naming the argument when the learning rate, schedule or AdamW arguments are out of range.

    Checked when the module is built: AdamW's own checks ran only when training started (after the data and the
    network were set up), naming none of these arguments (``tuple index out of range`` for one beta).
    """
    WarmupDecay(warmup_steps, 1, lr_decay, min_lr_ratio)  # validates the schedule arguments early
    if decay_steps is not None and decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1 (or None: the trainer's total steps), got {decay_steps}")
    if not 0 <= lr < math.inf:  # 0 trains nothing, which tests and frozen runs use
        raise ValueError(f"lr must be >= 0 and finite, got {lr}")
    pair = tuple(betas)
    if len(pair) != 2 or not all(0 <= b < 1 for b in pair):
        raise ValueError(f"betas must be two values in [0, 1) (AdamW's beta1, beta2), got {list(pair)}")
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps must be >= 0 and finite, got {eps}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay}")


def adamw(
    model: torch.nn.Module,
    lr: float,
    betas: Iterable[float],
    eps: float,
    weight_decay: float,
    param_ndims: dict[str, int] | None,
    fused: bool,
) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on >=2-D weights only, judged by ``param_ndims`` (the shapes the model was built
    with, so sharded FSDP parameters keep their decay) when given."""
    groups = param_groups(model, weight_decay, param_ndims)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def schedule_length(
    decay_steps: int | None, warmup_steps: int, lr_decay: str, lr: float, estimate: Callable[[], float]
) -> int:
    """The step at which the decay ends: ``decay_steps``, or else the trainer's estimated total steps.

    Args:
        decay_steps: the module's ``decay_steps`` (None: the trainer's estimate).
        warmup_steps: the module's ``warmup_steps``.
        lr_decay: the module's ``lr_decay``.
        lr: the module's peak ``lr`` (named in the warning below).
        estimate: returns the trainer's ``estimated_stepping_batches``; RuntimeError or AttributeError when no
            trainer is attached (a schedule to inspect, not to train with: ``warmup_steps + 1`` then).

    Raises:
        ValueError: ``decay_steps <= warmup_steps``, or a decaying schedule whose trainer does not know the length
            of training. Warns (rank zero) when the warm-up is not shorter than the run.
    """
    total = decay_steps
    if total is not None and total <= warmup_steps and lr_decay != "constant":
        # it used to drop to min_lr_ratio in the step after the warm-up; checked here, not in __init__, so that
        # checkpoints saved with such settings still load for validation and prediction
        raise ValueError(
            f"decay_steps {total} <= warmup_steps {warmup_steps}: decay_steps is the step at which the "
            "decay ends, counted from step 0 with the warm-up included (warmup_steps + the decay's length); "
            "pass another --model.init_args.decay_steps"
        )
    if total is None:
        try:
            estimated: float | None = estimate()
        except (RuntimeError, AttributeError):  # no trainer attached: a schedule to inspect, not to train with
            estimated = None
        known = estimated is not None and math.isfinite(estimated) and estimated > 0
        if estimated is not None and not known and lr_decay != "constant":
            # it used to decay to min_lr_ratio right after the warm-up
            raise ValueError(
                f"lr_decay={lr_decay!r} needs the length of training, which the trainer does not know here "
                "(data of unknown length): set trainer.max_steps, or model decay_steps, or lr_decay: constant"
            )
        total = int(estimated) if known else warmup_steps + 1  # type: ignore[arg-type]
        if known and warmup_steps >= total:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"warmup_steps {warmup_steps} >= the run's {total} steps: the learning rate never reaches lr "
                f"{lr} (lower --model.init_args.warmup_steps)"
            )
    return total


def warmup_decay_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total: int, lr_decay: str, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~cm3leon_lightning.modules.schedule.WarmupDecay` schedule of ``optimizer``."""
    schedule = WarmupDecay(warmup_steps, total, lr_decay, min_lr_ratio)
    # Through a plain function: LambdaLR saves a callable object's attributes in checkpoints and restores them
    # over this one's on resume, so a run resumed with a larger max_steps kept the old decay length (and sat at
    # the floor rate). The schedule is recomputed from the settings instead; the step count comes from the state.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def optimizer_settings(optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """This run's settings of ``optimizer`` (its id, and each group's ``initial_lr``, ``betas``, ``eps`` and
    ``weight_decay``), taken before a checkpoint's replace them; :func:`reapply_optimizer_settings` restores them."""
    return id(optimizer), [{k: g[k] for k in SETTINGS_KEYS} for g in optimizer.param_groups]


def reapply_optimizer_settings(scheduler_configs: Iterable[Any], made: tuple[int, list[dict[str, Any]]] | None) -> None:
    """Set each learning rate from this run's schedule at the restored step, for every ``LambdaLR`` of
    ``scheduler_configs`` (the trainer's ``lr_scheduler_configs``).

    The optimizer whose :func:`optimizer_settings` are ``made`` also takes back those settings, and its scheduler
    their ``initial_lr`` as base rates: a restored optimizer and scheduler hold the checkpoint's.
    """
    for config in scheduler_configs:
        sched = config.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            continue
        groups = sched.optimizer.param_groups
        if made is not None and made[0] == id(sched.optimizer) and len(made[1]) == len(groups):
            for group, settings in zip(groups, made[1]):
                group.update(settings)
            sched.base_lrs = [settings["initial_lr"] for settings in made[1]]
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
