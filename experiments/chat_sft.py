"""Supervised fine-tuning on the arithmetic chat demo: a small chat model from scratch on CPU.

    jaxgpt train chat_sft
    jaxgpt chat --model runs/chat_sft --prompt "What is 45 + 38?"

The data are generated conversations (`jaxgpt.arithmetic`: "What is A + B?" → "A + B = C",
a few phrasings, some multi-turn), rendered with the chat format (`jaxgpt.chat`), packed into
rows and trained only on what the assistant says. Problems with A ≡ B (mod 7) never appear in
training; the run ends by scoring 500 of them (report.json). Figures in docs/chat.md.
"""

from jaxgpt.experiment import (
    CheckpointSection,
    DataSection,
    EvalSection,
    Experiment,
    ModelSection,
    OptimSection,
    ScheduleSection,
)

EXPERIMENT = Experiment(
    name="chat_sft",
    model=ModelSection(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
    data=DataSection(
        dataset="chat_arithmetic",
        format="chat",
        source="arithmetic",
        tokenizer="char",
        val_fraction=0.05,
        batch_size=16,
    ),
    optim=OptimSection(lr=3e-3, weight_decay=0.1, beta2=0.99, grad_clip=1.0),
    schedule=ScheduleSection(max_steps=800, warmup_steps=100, min_lr_ratio=0.1),
    eval=EvalSection(
        interval=200,
        batches=10,
        log_interval=25,
        sample_tokens=40,
        sample_prompt="What is 12 + 34?",
        temperature=0.0,
    ),
    checkpoint=CheckpointSection(interval=200, keep=2),
)
