"""The learning-rate schedule of the CM3Leon and CLIP modules: linear warm-up, then linear or cosine decay (paper
table 3 gives the peak rates and the 1500 warm-up steps)."""

from __future__ import annotations

import math


class WarmupDecay:
    """Learning-rate multiplier: linear warm-up to 1, then linear or cosine decay to ``min_lr_ratio``.

    A callable object rather than a closure, so a scheduler's state dict holds only primitives.

    Args:
        warmup_steps: steps of linear warm-up from 0 (paper table 3: 1500).
        total_steps: the step at which the decay reaches ``min_lr_ratio``, counted from step 0 with the warm-up
            included; beyond it the ratio stays there.
        decay: ``"linear"``, ``"cosine"`` or ``"constant"`` (no decay after warm-up).
        min_lr_ratio: final learning rate as a fraction of the peak.
    """

    def __init__(self, warmup_steps: int, total_steps: int, decay: str = "linear", min_lr_ratio: float = 0.1) -> None:
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_decay must be 'linear', 'cosine' or 'constant', got {decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        """The multiplier of the peak rate at optimizer step ``step`` (0 for the first update)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
