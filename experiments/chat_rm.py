"""A reward model for the arithmetic chat demo: the SFT model's trunk learns to score answers.

    jaxgpt train chat_sft                                                # part 1: runs/chat_sft
    jaxgpt pairs --model runs/chat_sft --out data/chat_rm_pairs.jsonl --n-prompts 8000 \
        --samples 8 --max-pairs 4
    jaxgpt train chat_rm
    jaxgpt score --model runs/chat_rm --input runs/chat_rm/held_out_pairs.jsonl

The pairs are the SFT model's own answers to 8,000 training problems, a right one chosen over a
wrong one by the verifier (built like DPO's, `experiments/chat_dpo.py`, from 4x the prompts: on
2,000 the reward model learnt the training pairs but not the val ones; 8 samples and up to 4
pairs per prompt give 7,886 pairs in ≈ 2 min). The reward model starts from the SFT run's trunk
with a new scalar head (`model.head = "reward"`) and learns the Bradley–Terry loss on the score
read at each answer's `<|end|>`, with two auxiliary terms (`reward.*`, `jaxgpt.objectives.reward`):
the same loss on the scores where the two answers first differ (a wrong answer differs from a
right one in one digit of one worked sum: the score right there learns to judge that digit, which
the score at `<|end|>` then only has to carry), and the chosen answers' next-token loss (the
trunk stays a model of right answers). Without them 1,000 steps reached 70.6 % held-out; with
them 85.9 %. Its pairwise accuracy is measured on the val pairs (prompts never trained on) and on
pairs built the same way from 500 held-out problems (A ≡ B mod 7), which no stage trains on
(report.json). Figures in docs/chat.md.
"""

from jaxgpt.experiment import (
    CheckpointSection,
    DataSection,
    EvalSection,
    Experiment,
    ModelSection,
    OptimSection,
    RewardSection,
    ScheduleSection,
)

EXPERIMENT = Experiment(
    name="chat_rm",
    # The shape comes from the SFT run; 72 tokens hold every prompt + answer of the pairs (the
    # longest has 70: a wrong answer that rambles).
    model=ModelSection(block_size=72, dropout=0.0, init="runs/chat_sft", head="reward"),
    data=DataSection(
        dataset="chat_rm_pairs",
        format="preference",
        source="data/chat_rm_pairs.jsonl",
        tokenizer="char",
        val_fraction=0.05,
        batch_size=32,
    ),
    reward=RewardSection(nll_weight=1.0, first_difference_weight=1.0),
    optim=OptimSection(lr=3e-4, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleSection(max_steps=1000, warmup_steps=20, min_lr_ratio=0.1),
    eval=EvalSection(interval=100, batches=4, log_interval=10, sample_tokens=0),
    checkpoint=CheckpointSection(interval=100, keep=2),
)
