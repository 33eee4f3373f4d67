"""The CPU default: a character-level GPT on the bundled Shakespeare plays (minutes on 2 cores).

jaxgpt train shakespeare_char
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
    name="shakespeare_char",
    model=ModelSection(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
    data=DataSection(
        dataset="shakespeare_char", source="shakespeare", tokenizer="char", batch_size=16
    ),
    optim=OptimSection(lr=3e-3, weight_decay=0.1, beta2=0.99, grad_clip=1.0),
    schedule=ScheduleSection(max_steps=1200, warmup_steps=100, min_lr_ratio=0.1),
    eval=EvalSection(interval=200, batches=20, log_interval=25, sample_tokens=600),
    checkpoint=CheckpointSection(interval=200, keep=2),
)
