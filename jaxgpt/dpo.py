"""DPO as a stage of the one training loop: its frozen reference model and its figures.

Direct preference optimisation fine-tunes a chat model (the policy, started from `model.init`)
on preference pairs so that, relative to a frozen reference model, it raises the chosen answer's
log-probability more than the rejected one's (`jaxgpt.objectives.dpo`, `dpo_loss`). Nothing is
sampled during training and no reward model is needed. The pieces:

    jaxgpt.preferences   the pairs (`data.format = "preference"`) and the reference log-probs
                         table or per-batch function
    jaxgpt.objectives    `dpo` (the objective) and `dpo_loss` (the math)
    this module          which model is the reference (`load_reference`: `dpo.reference`, by
                         default `model.init`), how the data source gets its log-probs
                         (`source_options`), and the figures of the stage's report.json
                         (`stage_figures`, with `held_out_kl`)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError
from jaxgpt.params import Params
from jaxgpt.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Reference:
    """The frozen reference model of a DPO run."""

    path: str
    config: GPTConfig
    params: Params


def reference_path(exp: Any) -> tuple[str, str]:
    """(the reference run directory, the experiment key that names it)."""
    if exp.dpo.reference:
        return exp.dpo.reference, "dpo.reference"
    return exp.model.init, "model.init"


def load_reference(exp: Any, tokenizer: Tokenizer) -> Reference:
    """The reference model of a DPO experiment, checked against the data's tokenizer.

    ConfigError (one line) when there is none (`model.init = "scratch"` and no `dpo.reference`),
    when it is not a run directory, or when it reads other tokens or a shorter context.
    """
    from jaxgpt import checkpoint
    from jaxgpt.train import check_same_tokenizer

    path, key = reference_path(exp)
    if path == "scratch":
        raise ConfigError(
            "preference data trains with DPO, which needs a reference model, but model.init is "
            "'scratch': set model.init to the SFT run directory (the policy starts from it and it "
            "is the reference) or dpo.reference"
        )
    if not checkpoint.is_run_dir(path):
        raise ConfigError(
            f"{key} {path!r} is not a jaxgpt run directory; DPO's reference must be a trained "
            f"chat run (e.g. runs/chat_sft)"
        )
    try:
        check_same_tokenizer(checkpoint.load_tokenizer(path), tokenizer, path)
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.init", f"the DPO reference ({key})", 1)) from err
    config, params, _, _ = checkpoint.load_run_for_inference(path)
    if config.vocab_size < tokenizer.n_vocab:
        raise ConfigError(
            f"the DPO reference {path!r} has vocab_size {config.vocab_size}, smaller than the "
            f"data's {tokenizer.n_vocab}: it has no chat tokens (fine-tune it on chat data first)"
        )
    if config.block_size < exp.model.block_size:
        raise ConfigError(
            f"the DPO reference {path!r} has a context of {config.block_size} tokens, shorter "
            f"than model.block_size {exp.model.block_size}"
        )
    return Reference(str(path), config, params)


def source_options(exp: Any, reference: Reference, *, progress: bool) -> dict[str, Any]:
    """Keyword arguments of `jaxgpt.batches.preference_source` for this run's reference."""
    from jaxgpt.preferences import reference_logprobs

    return {
        "reference": reference_logprobs(reference.params, reference.config),
        "precompute": exp.dpo.reference_logprobs == "precomputed",
        "progress": progress,
    }


# --------------------------------------------------------------------------- figures


def held_out_kl(
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    reference: Reference,
    *,
    n: int = 500,
    seed: int = 1,
    batch_size: int = 100,
    max_new_tokens: int = 40,
) -> dict[str, float]:
    """Mean KL(π ‖ π_ref) per answer on `n` held-out arithmetic prompts, with its standard error.

    Answers are sampled from the policy at temperature 1; each contributes
    `log π(answer | prompt) - log π_ref(answer | prompt)` summed over its tokens (up to and
    including `<|end|>`), whose mean over answers drawn from π estimates the KL without bias.
    """
    from jaxgpt import arithmetic, chat
    from jaxgpt.decode import generate
    from jaxgpt.eval import masked_logprob_sum

    prompts = arithmetic.reply_prompts(arithmetic.held_out_problems(n, seed), tokenizer)
    end = chat.chat_tokens(tokenizer).end
    max_new_tokens = min(max_new_tokens, config.block_size - max(len(p) for p in prompts))
    key = jax.random.key(seed)
    kl: list[float] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rows = generate(params, config, chunk, max_new_tokens, key=jax.random.fold_in(key, i),
                        temperature=1.0, eos_id=end)  # fmt: skip
        length = max(len(r) for r in rows)
        tokens_BT = np.zeros((len(rows), length), np.int32)
        mask_BT1 = np.zeros((len(rows), length - 1), np.float32)
        for b, (prompt, row) in enumerate(zip(chunk, rows)):
            tokens_BT[b, : len(row)] = row
            mask_BT1[b, len(prompt) - 1 : len(row) - 1] = 1.0  # targets: the answer's tokens
        policy = masked_logprob_sum(params, config, tokens_BT, mask_BT1)
        ref = masked_logprob_sum(reference.params, reference.config, tokens_BT, mask_BT1)
        kl += (np.asarray(policy) - np.asarray(ref)).tolist()
    values = np.asarray(kl, np.float64)
    return {"mean": float(values.mean()), "stderr": float(values.std() / np.sqrt(len(values))),
            "n": len(values)}  # fmt: skip


def stage_figures(
    exp: Any,
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    reference: Reference | None,
    last_eval: dict[str, float],
    *,
    arithmetic_task: bool,
) -> dict[str, Any]:
    """The DPO part of report.json: β, the reference (and its own held-out accuracy when its
    report.json has one), reward accuracy and margin on the val pairs, and for the arithmetic
    demo the mean KL to the reference on answers to held-out prompts."""
    figures: dict[str, Any] = {
        "beta": exp.dpo.beta,
        "reference": reference.path if reference else reference_path(exp)[0],
        "reference_logprobs": exp.dpo.reference_logprobs,
        "val_reward_accuracy": last_eval.get("val_reward_accuracy"),
        "val_reward_margin": last_eval.get("val_reward_margin"),
    }
    if reference is None:
        return figures
    report = Path(reference.path) / "report.json"
    if report.is_file():
        held_out = json.loads(report.read_text()).get("held_out") or {}
        figures["reference_held_out_accuracy"] = held_out.get("accuracy")
    if arithmetic_task:
        figures["kl_to_reference"] = held_out_kl(params, config, tokenizer, reference)
    return figures
