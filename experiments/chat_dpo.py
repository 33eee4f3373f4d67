"""DPO on the arithmetic chat demo: the SFT model learns from its own ranked answers.

    jaxgpt train chat_sft                                              # part 1: runs/chat_sft
    jaxgpt pairs --model runs/chat_sft --out data/chat_rm_pairs.jsonl --n-prompts 8000 \
        --samples 8 --max-pairs 4
    jaxgpt train chat_dpo

DPO learns from the reward model's pairs (`experiments/chat_rm.py`): `jaxgpt pairs` samples 8
answers to each of 8,000 training problems from the SFT model, scores them with the verifier and
pairs a right answer with a wrong one, up to 4 pairs a prompt (a prompt whose answers are all
right, or all wrong, gives no pair). DPO then starts from the SFT run, which is also its frozen
reference, and raises the right answers' log-probability relative to the wrong ones' (with the
right answers' negative log-likelihood added to the loss, `dpo.nll_weight`). No
held-out problem (A ≡ B mod 7) is a prompt; the run ends by scoring 500 of them and measuring the
KL to the SFT model on its own answers to them (report.json). Figures in docs/chat.md.
"""

from jaxgpt.experiment import (
    CheckpointSection,
    DataSection,
    DPOSection,
    EvalSection,
    Experiment,
    ModelSection,
    OptimSection,
    ScheduleSection,
)

EXPERIMENT = Experiment(
    name="chat_dpo",
    # The shape comes from the SFT run; 72 tokens hold every prompt + answer of the pairs.
    model=ModelSection(block_size=72, dropout=0.0, init="runs/chat_sft"),
    data=DataSection(
        # The reward model's pairs, prepared once for both stages (the same settings).
        dataset="chat_rm_pairs",
        format="preference",
        source="data/chat_rm_pairs.jsonl",
        tokenizer="char",
        val_fraction=0.05,
        batch_size=32,
    ),
    optim=OptimSection(lr=5e-5, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleSection(max_steps=100, warmup_steps=10, min_lr_ratio=0.1),
    eval=EvalSection(
        interval=50,
        batches=4,
        log_interval=10,
        sample_tokens=40,
        sample_prompt="What is 12 + 34?",
        temperature=0.0,
    ),
    checkpoint=CheckpointSection(interval=100, keep=2),
    # Plain DPO lowers the right answers' probability too and the held-out accuracy with it
    # (docs/chat.md); the chosen answers' NLL, weighted 10, keeps them likely.
    dpo=DPOSection(beta=0.1, nll_weight=10.0),
)
