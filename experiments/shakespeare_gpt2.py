"""GPT-2 BPE on the bundled Shakespeare plays: a small model from scratch (CPU: slow-ish; the
50257-way output dominates), or fine-tuning a Hugging Face GPT-2 directory:

    jaxgpt train shakespeare_gpt2
    jaxgpt train shakespeare_gpt2 --set model.init=/path/to/gpt2 --set optim.lr=1e-4 \
        --set schedule.max_steps=300 --out runs/shakespeare_gpt2_ft

With model.init set, the shape comes from the checkpoint; block_size stays the window length.
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
    name="shakespeare_gpt2",
    model=ModelSection(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1),
    data=DataSection(
        dataset="shakespeare_gpt2", source="shakespeare", tokenizer="gpt2", batch_size=8
    ),
    optim=OptimSection(lr=1e-3, weight_decay=0.1, beta2=0.99, decay_embeddings=False),
    schedule=ScheduleSection(max_steps=1500, warmup_steps=100, min_lr_ratio=0.1),
    eval=EvalSection(interval=250, batches=20, log_interval=25, sample_tokens=200),
    checkpoint=CheckpointSection(interval=250, keep=2),
)
