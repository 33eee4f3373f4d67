"""The optimiser: AdamW with a warmup + cosine schedule, selective weight decay and clipping.

Gradient accumulation is not here: the train step (`jaxgpt.train`) sums gradients over its
micro-batches with a `lax.scan` and applies this optimiser once per step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxgpt.experiment import OptimSection, ScheduleSection

EMBEDDINGS = ("wte", "wpe")


def lr_schedule(optim: OptimSection, schedule: ScheduleSection) -> optax.Schedule:
    """0 → optim.lr linearly over warmup_steps, then cosine to min_lr_ratio · lr at max_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=schedule.warmup_steps,
        decay_steps=schedule.max_steps,
        end_value=optim.lr * schedule.min_lr_ratio,
    )


def decay_mask(params: Any, *, decay_embeddings: bool = True) -> Any:
    """True for the leaves weight decay applies to: ≥2-D matrices (optionally not the embeddings).

    Biases and LayerNorm scales/biases (1-D) are never decayed.
    """

    def decays(path: tuple, leaf: Any) -> bool:
        top = getattr(path[0], "key", None)
        if top in EMBEDDINGS and not decay_embeddings:
            return False
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimSection, schedule: ScheduleSection) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule with the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate=lr_schedule(optim, schedule),
            b1=optim.beta1,
            b2=optim.beta2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=lambda params: decay_mask(params, decay_embeddings=optim.decay_embeddings),
        ),
    )
