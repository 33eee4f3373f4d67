"""The GPT-2 124M reproduction recipe, for GPU/TPU on OpenWebText/FineWeb-style token files.

Prepare the corpus once (GPT-2 BPE documents → uint16 shards, all cores; docs/data.md), then
train on the prepared files:

    jaxgpt prepare 'openwebtext/*.jsonl.gz' data/openwebtext --tokenizer gpt2 --val-fraction 0.0005
    jaxgpt train gpt2_124m

or train directly on llm.c / modded-nanogpt FineWeb shards (a directory of fineweb_train_*.bin
and fineweb_val_*.bin, read as they are):

    jaxgpt train gpt2_124m --data-dir /data --set data.dataset=fineweb10B

The global batch is 16 sequences × 1024 tokens × 32 accumulated micro-batches = 524,288 tokens
(~0.5M, as in GPT-2 / GPT-3 small); 19,073 steps ≈ 10B tokens. Raise data.batch_size and lower
optim.grad_accum by the same factor when the device has the memory (same global batch).
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
    name="gpt2_124m",
    model=ModelSection(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, dtype="bfloat16"
    ),
    # "prepared": use data/openwebtext as it is (made by `jaxgpt prepare`), never re-tokenise.
    data=DataSection(dataset="openwebtext", source="prepared", tokenizer="gpt2", batch_size=16),
    optim=OptimSection(
        lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=32
    ),
    schedule=ScheduleSection(max_steps=19073, warmup_steps=715, min_lr_ratio=0.1),
    eval=EvalSection(interval=250, batches=20, log_interval=10, sample_tokens=100),
    checkpoint=CheckpointSection(interval=1000, keep=3),
)
