"""Experiment configs: what one training run is, as frozen dataclasses.

An experiment is a Python file `experiments/NAME.py` that defines `EXPERIMENT = Experiment(...)`.
It has these sections, each a frozen dataclass:

    model       shape of the GPT (or where to initialise it from) and its dropout / compute dtype
    data        which corpus, how it is tokenised and split, the batch size
    optim       AdamW, weight decay, gradient clipping, gradient accumulation
    schedule    number of steps, linear warmup, cosine decay to a floor
    eval        how often and on how many batches train/val loss is measured, the final
                sample, and multiple-choice tasks scored at each evaluation
    checkpoint  how often to save and how many checkpoints to keep
    parallel    how the step is laid out on devices
    dpo         direct preference optimisation (runs on preference data): β and the reference
    reward      the reward model (preference data with model.head="reward"): its auxiliary loss
    rl          the PPO stage (RLHF): reference policy, reward, KL penalty, the clipped update

Any field can be overridden on the command line with `--set section.field=value`; values are
parsed and type-checked against the field's type, and an unknown key suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any

from jaxgpt.config import ATTENTION_BACKENDS, HEADS, GPTConfig
from jaxgpt.data import ENCODING_ERRORS
from jaxgpt.errors import ConfigError
from jaxgpt.sharding import parse_mesh

DATA_FORMATS = ("text", "chat", "preference", "prompts")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The network. `init` is "scratch", a Hugging Face GPT-2 directory, or a jaxgpt run dir.

    When `init` is a directory, the shape fields are taken from it and only dropout/dtype apply.
    `head` is what the model outputs (`GPTConfig.head`): "lm" for a policy, "reward" for a reward
    model, "lm+value" for a PPO policy with its value head; a run directory trained with the
    "lm" head can start either of the others (`jaxgpt.heads.with_head`).
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    use_bias: bool = True
    dtype: str = "float32"
    attention: str = "xla"  # backend: xla | cudnn | pallas | auto (see docs/kernels.md)
    init: str = "scratch"
    head: str = "lm"  # lm | reward | lm+value


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The corpus and its batches.

    Attributes:
      dataset: name of the prepared data directory, `<data_dir>/<dataset>`.
      format: "text" (a corpus, trained on every next token), "chat" (conversations in .jsonl,
        packed into rows and trained only on what the assistant says; see docs/chat.md),
        "preference" (prompts with a chosen and a rejected answer, `jaxgpt.preferences`; for
        DPO, whose reference model is `model.init`, or a reward model) or "prompts" (PPO:
        prompts of the arithmetic demo answered by the policy itself, `jaxgpt.rlhf`; see the rl
        section).
      source: "shakespeare" (the bundled plays), a .txt file, or a directory of .txt files; for
        tokenizer "gpt2" also .jsonl / .jsonl.gz / .parquet documents or a glob (docs/data.md).
      tokenizer: "char" (vocabulary = the corpus' characters) or "gpt2" (BPE).
      val_fraction: share of the corpus held out for validation.
      split_seed: seed of the deterministic train/val split (chunks of `split_chunk` characters).
      split_chunk: size in characters of the pieces assigned to train or val.
      batch_size: sequences per micro-batch (B); the global batch is B · optim.grad_accum.
      seed: seed of the batch sampler (which windows each step sees).
      errors: "strict" (a corpus that is not valid UTF-8 is an error naming file and byte
        offset) or "replace" (invalid bytes become U+FFFD, with a warning giving their count).
      align_documents: windows begin at a document start (its <|endoftext|>) instead of
        anywhere; GPT-2 BPE data only (docs/data.md).
    """

    dataset: str = "shakespeare_char"
    format: str = "text"
    source: str = "shakespeare"
    tokenizer: str = "char"
    val_fraction: float = 0.1
    split_seed: int = 0
    split_chunk: int = 8192
    batch_size: int = 32
    seed: int = 0
    errors: str = "strict"
    align_documents: bool = False


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with global-norm clipping; weight decay on ≥2-D matrices only."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    """Linear warmup from 0 to optim.lr, then cosine decay to `min_lr_ratio · lr` at max_steps."""

    max_steps: int = 2000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    seed: int = 0  # parameter init and dropout keys


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Train/val loss on `batches` fixed batches every `interval` steps; log every log_interval.

    `tasks` adds multiple-choice files scored at each evaluation: comma-separated `FORMAT:PATH`
    entries (FORMAT `hellaswag` or `mc`, see docs/eval.md), each logged as `task/<file stem>/acc`
    and `task/<file stem>/acc_norm`; `task_limit` keeps each file's first items (0 = all).
    """

    interval: int = 250
    batches: int = 20
    log_interval: int = 10
    sample_tokens: int = 500
    sample_prompt: str = "\n"
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k filter
    tasks: str = ""
    task_limit: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Save every `interval` steps, at the end and on Ctrl-C; keep the last `keep` + the best."""

    interval: int = 250
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    """How the train step is laid out on devices (see `jaxgpt.sharding` and docs/sharding.md).

    `mesh` gives axis sizes, e.g. "data=2,fsdp=4" or "fsdp=-1,tensor=2" (-1: the rest); empty
    puts every device on the data axis. It may change between a run and its resumption.
    """

    mesh: str = ""


REFERENCE_LOGPROBS = ("precomputed", "on_the_fly")
DPO_TOKENS = ("answer", "first_difference")


@dataclasses.dataclass(frozen=True)
class DPOSection:
    """Direct preference optimisation, the objective of `data.format = "preference"` runs.

    Attributes:
      beta: β of the DPO loss `-log σ(β[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])`;
        larger keeps the policy closer to the reference.
      reference: run directory of the frozen reference model; "" = `model.init` (the SFT run the
        policy starts from).
      reference_logprobs: "precomputed" (every training pair scored once when the run starts) or
        "on_the_fly" (each batch scored as it is drawn: no table, one more forward per step).
      nll_weight: adds this multiple of the chosen answers' negative log-likelihood per token
        to the loss (0 = plain DPO); see `jaxgpt.objectives.dpo`.
      tokens: which tokens make a sequence's log-probability: "answer" (all of the answer's, as
        in the DPO paper) or "first_difference" (only the first token where chosen and rejected
        differ: one choice contrasted in one context; see `jaxgpt.objectives.dpo`).
      freeze_embeddings: hold the token embedding (tied to the output layer) fixed.
    """

    beta: float = 0.1
    reference: str = ""
    reference_logprobs: str = "precomputed"
    nll_weight: float = 0.0
    tokens: str = "answer"
    freeze_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """The reward model, the objective of preference data with `model.head = "reward"`.

    Attributes:
      nll_weight: adds this multiple of the chosen answers' next-token loss (through the tied
        output layer of the same pass) to the Bradley–Terry loss.
      first_difference_weight: adds this multiple of the Bradley–Terry loss of the scores read
        at the first token where chosen and rejected differ (`objectives.first_difference_loss`).
    Both 0 = the pairwise loss at the answer's `<|end|>` alone; see `jaxgpt.objectives.reward`.
    """

    nll_weight: float = 0.0
    first_difference_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RLSection:
    """RLHF with PPO (`jaxgpt.rlhf`), used when `data.format="prompts"`; docs/chat.md.

    Each step samples one answer to each of `data.batch_size` prompts, scores it, and updates the
    policy (`model.init`, an SFT run; `model.head="lm+value"`) over `epochs` passes of
    `minibatches` minibatches.

    Attributes:
      reference: the frozen reference policy's run directory (the SFT run): the KL penalty keeps
        the policy near it. Required.
      reward: "model" (the reward model `reward_model`) or "arithmetic" (the demo's verifier:
        1 for a correct sum, 0 otherwise; for tests and comparison).
      reward_model: run directory of a reward model (`model.head="reward"`).
      beta: the KL penalty's coefficient β (its start when `target_kl` > 0).
      target_kl: 0 keeps β fixed; > 0 adapts β each step towards this KL per answer (nats).
      kl_horizon: the adaptive controller's horizon (in answers).
      epochs, minibatches: passes over each rollout batch, and minibatches per pass.
      clip: ε of the clipped surrogate; value_clip: of the value loss; value_coef: its weight.
      gamma, lam: GAE's discount and λ.
      gen_tokens: most tokens sampled per answer; temperature: the sampling temperature.
    """

    reference: str = ""
    reward: str = "model"
    reward_model: str = ""
    beta: float = 0.05
    target_kl: float = 0.0
    kl_horizon: int = 10000
    epochs: int = 2
    minibatches: int = 2
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    gen_tokens: int = 32
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str = "experiment"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    parallel: ParallelSection = ParallelSection()
    dpo: DPOSection = DPOSection()
    reward: RewardSection = RewardSection()
    rl: RLSection = RLSection()

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        """Build from `to_dict()` output (e.g. a run's experiment.json).

        Missing keys take their defaults; an unknown key or a section that is not a dict is a
        ConfigError naming it (values are type-checked only by `validate`).
        """
        if not isinstance(d, dict):
            raise ConfigError(f"an experiment must be a JSON object, got {type(d).__name__}")
        types_ = _section_types()
        unknown = sorted(set(d) - {"name", *types_})
        if unknown:
            raise ConfigError(
                f"unknown experiment key {unknown[0]!r}; expected 'name' or a section of "
                f"{sorted(types_)}"
            )
        sections = {}
        for name, section_cls in types_.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"experiment section {name!r} must be an object, got {values!r}")
            fields = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(values) - fields)
            if unknown:
                hint = difflib.get_close_matches(unknown[0], fields, n=1)
                suggestion = f"; did you mean {name}.{hint[0]}?" if hint else ""
                raise ConfigError(f"unknown experiment key {name}.{unknown[0]!r}{suggestion}")
            sections[name] = section_cls(**values)
        return cls(name=d.get("name", "experiment"), **sections)

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of a from-scratch model with this vocabulary size."""
        m = self.model
        return GPTConfig(
            vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
            n_embd=m.n_embd, embd_dropout=m.dropout, attn_dropout=m.dropout,
            resid_dropout=m.dropout, use_bias=m.use_bias, dtype=m.dtype, attention=m.attention,
            head=m.head,
        )  # fmt: skip

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.optim.grad_accum * self.model.block_size


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Experiment)
    return {name: t for name, t in hints.items() if name != "name"}


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


def validate(exp: Experiment) -> None:
    """Raise ConfigError for values no run could use (types are checked by `apply_overrides`)."""
    _positive("model", exp.model, "n_layer", "n_head", "n_embd", "block_size")
    if exp.model.n_embd % exp.model.n_head:
        raise ConfigError(
            f"model.n_embd ({exp.model.n_embd}) must be divisible by model.n_head "
            f"({exp.model.n_head}): each head gets n_embd / n_head dimensions"
        )
    _positive("data", exp.data, "batch_size", "split_chunk")
    for name in ("split_seed", "seed"):  # numpy's generators take only non-negative seeds
        value = getattr(exp.data, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"data.{name} must be an integer >= 0, got {value!r}")
    _positive("optim", exp.optim, "grad_accum")
    _positive("schedule", exp.schedule, "max_steps")
    parse_mesh(exp.parallel.mesh)  # a malformed mesh is an error now, not at the first step
    if exp.model.attention not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"model.attention must be one of {ATTENTION_BACKENDS}, got {exp.model.attention!r}"
        )
    if exp.model.head not in HEADS:
        raise ConfigError(f"model.head must be one of {HEADS}, got {exp.model.head!r}")
    _positive("eval", exp.eval, "interval", "batches", "log_interval")
    _positive("checkpoint", exp.checkpoint, "interval", "keep")
    if not 0.0 < exp.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {exp.data.val_fraction!r}")
    if exp.data.format not in DATA_FORMATS:
        raise ConfigError(f"data.format must be one of {DATA_FORMATS}, got {exp.data.format!r}")
    if exp.model.head == "reward" and exp.data.format != "preference":
        raise ConfigError(
            f"model.head='reward' trains a reward model on preference pairs "
            f"(data.format='preference'), but data.format is {exp.data.format!r}"
        )
    if exp.data.format == "prompts":
        _validate_rl(exp)
    if exp.data.tokenizer not in ("char", "gpt2"):
        raise ConfigError(f"data.tokenizer must be 'char' or 'gpt2', got {exp.data.tokenizer!r}")
    if exp.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {exp.optim.lr!r}")
    if not 0.0 <= exp.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"schedule.min_lr_ratio must be in [0, 1], got {exp.schedule.min_lr_ratio!r}"
        )
    if not 0 <= exp.schedule.warmup_steps < exp.schedule.max_steps:
        raise ConfigError(
            f"schedule.warmup_steps must be in [0, max_steps={exp.schedule.max_steps}), "
            f"got {exp.schedule.warmup_steps!r}"
        )
    if not 0.0 <= exp.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {exp.model.dropout!r}")
    if exp.data.errors not in ENCODING_ERRORS:
        raise ConfigError(f"data.errors must be one of {ENCODING_ERRORS}, got {exp.data.errors!r}")
    _validate_eval_sampling(exp.eval)
    beta = exp.dpo.beta
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta < math.inf:
        raise ConfigError(f"dpo.beta must be a finite number > 0, got {beta!r}")
    weights = {
        "dpo.nll_weight": exp.dpo.nll_weight,
        "reward.nll_weight": exp.reward.nll_weight,
        "reward.first_difference_weight": exp.reward.first_difference_weight,
    }
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < math.inf:
            raise ConfigError(f"{name} must be a finite number >= 0, got {w!r}")
    if exp.dpo.tokens not in DPO_TOKENS:
        raise ConfigError(f"dpo.tokens must be one of {DPO_TOKENS}, got {exp.dpo.tokens!r}")
    if exp.dpo.reference_logprobs not in REFERENCE_LOGPROBS:
        raise ConfigError(
            f"dpo.reference_logprobs must be one of {REFERENCE_LOGPROBS}, got "
            f"{exp.dpo.reference_logprobs!r}"
        )
    eval_tasks(exp.eval)
    limit = exp.eval.task_limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"eval.task_limit must be an integer >= 0 (0 = all), got {limit!r}")


def _validate_rl(exp: Experiment) -> None:
    """A PPO experiment's settings (`data.format="prompts"`), checked before any work."""
    rl = exp.rl
    if not rl.reference:
        raise ConfigError(
            "a PPO run (data.format='prompts') needs a reference policy: set rl.reference to the "
            "SFT run directory (the KL penalty keeps the policy near it)"
        )
    if exp.model.head != "lm+value":
        raise ConfigError(
            f"a PPO run trains a policy with a value head: set model.head='lm+value' "
            f"(got {exp.model.head!r})"
        )
    if exp.data.source != "arithmetic":
        raise ConfigError(
            f"PPO prompts come from the arithmetic demo: data.source must be 'arithmetic', got "
            f"{exp.data.source!r}"
        )
    if rl.reward == "model" and not rl.reward_model:
        raise ConfigError(
            "rl.reward='model' needs rl.reward_model (a reward model's run directory), or use "
            "rl.reward=arithmetic (the verifier)"
        )
    _positive("rl", rl, "epochs", "minibatches", "gen_tokens", "kl_horizon")
    if exp.data.batch_size % rl.minibatches:
        raise ConfigError(
            f"data.batch_size ({exp.data.batch_size} prompts per step) must be divisible by "
            f"rl.minibatches ({rl.minibatches})"
        )
    for name in ("beta", "target_kl", "value_coef", "gamma", "lam"):
        value = getattr(rl, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ConfigError(f"rl.{name} must be a finite number >= 0, got {value!r}")
    for name in ("clip", "value_clip", "temperature"):
        value = getattr(rl, name)
        if not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
            raise ConfigError(f"rl.{name} must be a finite number > 0, got {value!r}")


def eval_tasks(ev: EvalSection) -> list[tuple[str, str, Path]]:
    """`eval.tasks` as (name, format, path) triples; the name is the file's stem.

    Only the syntax is checked here (the files are read when a run starts): a ConfigError for an
    entry without `FORMAT:`, an unknown format, or two files with the same stem.
    """
    from jaxgpt.eval import FORMATS

    if not isinstance(ev.tasks, str):
        raise ConfigError(f"eval.tasks must be a string of FORMAT:PATH entries, got {ev.tasks!r}")
    out: list[tuple[str, str, Path]] = []
    for entry in filter(None, (e.strip() for e in ev.tasks.split(","))):
        fmt, sep, path = entry.partition(":")
        if not sep or not path.strip():
            raise ConfigError(
                f"eval.tasks entry {entry!r}: expected FORMAT:PATH with FORMAT one of "
                f"{list(FORMATS)}, e.g. mc:questions.jsonl"
            )
        if fmt.strip() not in FORMATS:
            raise ConfigError(
                f"eval.tasks entry {entry!r}: unknown format {fmt.strip()!r}; expected one of "
                f"{list(FORMATS)}"
            )
        path = Path(path.strip()).expanduser()
        if path.stem in [name for name, _, _ in out]:
            raise ConfigError(
                f"eval.tasks: two files named {path.stem!r}; their metrics would share "
                f"task/{path.stem}/acc (rename one)"
            )
        out.append((path.stem, fmt.strip(), path))
    return out


def _validate_eval_sampling(ev: EvalSection) -> None:
    """The final sample's settings, checked now rather than after the whole run."""
    t = ev.temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t < math.inf:
        raise ConfigError(f"eval.temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if not isinstance(ev.top_k, int) or isinstance(ev.top_k, bool) or ev.top_k < 0:
        raise ConfigError(f"eval.top_k must be an integer >= 0 (0 = no filter), got {ev.top_k!r}")
    if not isinstance(ev.sample_tokens, int) or ev.sample_tokens < 0:
        raise ConfigError(
            f"eval.sample_tokens must be an integer >= 0 (0 = no sample), got {ev.sample_tokens!r}"
        )


# --------------------------------------------------------------------------- overrides


def valid_keys() -> list[str]:
    """Every `section.field` that `--set` accepts."""
    keys = ["name"]
    for section, cls in _section_types().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """`text` as a value of the field's type; ConfigError naming the key if it is not one."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(annotation), annotation)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={text}: expected a boolean (true/false), got {text!r}")
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--set {key}={text}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--set {key}={text}: expected a number, got {text!r}") from None
    return text


def apply_overrides(exp: Experiment, assignments: list[str]) -> Experiment:
    """`exp` with each "section.field=value" applied (parsed to the field's type)."""
    keys = valid_keys()
    changes: dict[str, Any] = {}  # validated together, so the order of --set does not matter
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        if key not in keys:
            hint = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            if not hint:  # a bare field name: find its section
                hint = [k for k in keys if k.split(".")[-1] == key.split(".")[-1]][:1]
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"--set: unknown key {key!r}{suggestion} (keys look like optim.lr)")
        if key == "name":
            changes["name"] = text
            continue
        section_name, field_name = key.split(".")
        section = changes.get(section_name, getattr(exp, section_name))
        annotation = typing.get_type_hints(type(section))[field_name]
        value = _parse_value(key, text, annotation)
        changes[section_name] = dataclasses.replace(section, **{field_name: value})
    return dataclasses.replace(exp, **changes) if changes else exp


def diff(a: Experiment, b: Experiment) -> list[str]:
    """The `section.field` keys whose values differ between two experiments."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for key in valid_keys():
        parts = key.split(".")
        va, vb = da, db
        for p in parts:
            va, vb = (
                va.get(p) if isinstance(va, dict) else None,
                vb.get(p) if isinstance(vb, dict) else None,
            )
        if va != vb:
            out.append(key)
    return out


# --------------------------------------------------------------------------- loading


def experiment_dirs() -> list[Path]:
    """Where experiment names are looked up: ./experiments, then the bundled ones.

    The bundled experiments are the repository's experiments/, installed as the package
    `jaxgpt.experiments` (a source checkout on `sys.path` finds them next to `jaxgpt/`).
    """
    try:
        bundled = Path(str(importlib.resources.files("jaxgpt.experiments")))
    except ModuleNotFoundError:
        bundled = Path(__file__).resolve().parent.parent / "experiments"
    return [Path.cwd() / "experiments", bundled]


def available_experiments() -> list[str]:
    names = set()
    for d in experiment_dirs():
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.py") if not p.stem.startswith("_")}
    return sorted(names)


def find_experiment(spec: str) -> Path:
    """The file of experiment `spec`: a path to a .py file, or a name in `experiment_dirs()`."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"experiment file {spec!r} does not exist")
        return path
    for d in experiment_dirs():
        candidate = d / f"{spec}.py"
        if candidate.is_file():
            return candidate
    known = available_experiments()
    hint = difflib.get_close_matches(spec, known, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(
        f"unknown experiment {spec!r}{suggestion}; known experiments: "
        f"{', '.join(known) or '(none)'}, or pass the path of a .py file"
    )


def load_experiment(spec: str, overrides: list[str] | None = None) -> Experiment:
    """Load `EXPERIMENT` from an experiment file (by name or path) and apply `--set` overrides."""
    path = find_experiment(spec)
    module_spec = importlib.util.spec_from_file_location(f"jaxgpt_experiment_{path.stem}", path)
    module = types.ModuleType(module_spec.name)
    module.__file__ = str(path)
    try:
        module_spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"experiment file {path} failed to load: {err}") from err
    exp = getattr(module, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ConfigError(f"{path} must define EXPERIMENT = jaxgpt.experiment.Experiment(...)")
    return apply_overrides(exp, overrides or [])
