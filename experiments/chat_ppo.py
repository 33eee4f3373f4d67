"""RLHF with PPO on the arithmetic chat demo: the SFT run, tuned against a reward model.

    jaxgpt train chat_sft                         # the policy to start from (runs/chat_sft)
    jaxgpt train chat_ppo --set rl.reward_model=runs/chat_rm

Each step samples one answer to each of 64 arithmetic prompts (never a held-out problem), scores
them with the frozen reward model, and takes 2 epochs × 2 minibatches of PPO updates with a KL
penalty against the SFT model. `--set rl.reward=arithmetic` uses the verifier as the reward
instead; `--set rl.beta=0` shows what the KL penalty prevents. Figures in docs/chat.md.
"""

from jaxgpt.experiment import (
    CheckpointSection,
    DataSection,
    EvalSection,
    Experiment,
    ModelSection,
    OptimSection,
    RLSection,
    ScheduleSection,
)

EXPERIMENT = Experiment(
    name="chat_ppo",
    model=ModelSection(block_size=128, init="runs/chat_sft", head="lm+value"),
    data=DataSection(
        dataset="chat_arithmetic",
        format="prompts",
        source="arithmetic",
        tokenizer="char",
        batch_size=64,
    ),
    optim=OptimSection(lr=3e-5, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleSection(max_steps=80, warmup_steps=5, min_lr_ratio=1.0),
    rl=RLSection(
        reference="runs/chat_sft",
        reward="model",
        reward_model="runs/chat_rm",
        beta=0.05,
        epochs=2,
        minibatches=2,
        gen_tokens=32,
        temperature=1.0,
    ),
    eval=EvalSection(
        interval=40,
        log_interval=5,
        sample_tokens=40,
        sample_prompt="What is 12 + 34?",
        temperature=0.0,
    ),
    checkpoint=CheckpointSection(interval=40, keep=2),
)
