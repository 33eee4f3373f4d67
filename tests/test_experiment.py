"""Experiment configs: loading by name or path, --set overrides, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxgpt.cli import main
from jaxgpt.errors import ConfigError
from jaxgpt.experiment import (
    Experiment,
    apply_overrides,
    available_experiments,
    diff,
    load_experiment,
)


def test_bundled_experiments_load():
    for name in ("shakespeare_char", "shakespeare_gpt2", "gpt2_124m"):
        assert name in available_experiments()
        exp = load_experiment(name)
        assert exp.name == name


def test_wheel_ships_every_package_and_the_experiments():
    """pyproject lists its packages by hand (to map experiments/ to `jaxgpt.experiments`): every
    package of the source tree must be on that list, or a plain install would lack it."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(root).parts) for init in root.glob("jaxgpt/**/__init__.py")
    }
    listed = set(setuptools["packages"])
    assert on_disk | {"jaxgpt.experiments"} <= listed
    for data_only in listed - on_disk - {"jaxgpt.experiments"}:  # asset and page folders
        assert data_only.startswith(("jaxgpt.assets", "jaxgpt.explore.static"))
        assert (root / data_only.replace(".", "/")).is_dir(), data_only
    assert setuptools["package-dir"] == {"jaxgpt.experiments": "experiments"}
    assert (root / "experiments" / "__init__.py").is_file()


def test_load_by_path_and_override(tiny_experiment_file):
    path = tiny_experiment_file(steps=30)
    exp = load_experiment(str(path), ["optim.lr=3e-3", "model.n_layer=3", "eval.top_k=5"])
    assert exp.optim.lr == 3e-3 and exp.model.n_layer == 3 and exp.eval.top_k == 5
    assert exp.model.n_embd == 32  # untouched fields keep the file's values
    assert sorted(diff(load_experiment(str(path)), exp)) == [
        "eval.top_k", "model.n_layer", "optim.lr",
    ]  # fmt: skip


def test_overrides_are_validated_together():
    exp = load_experiment("shakespeare_char")
    # Alone, max_steps=50 is below the warmup; with the warmup lowered too it is fine.
    out = apply_overrides(exp, ["schedule.max_steps=50", "schedule.warmup_steps=5"])
    assert out.schedule.max_steps == 50
    with pytest.raises(ConfigError, match="warmup_steps"):
        apply_overrides(exp, ["schedule.max_steps=50"])


def test_bool_and_string_values():
    exp = apply_overrides(
        load_experiment("shakespeare_char"), ["optim.decay_embeddings=false", "name=other"]
    )
    assert exp.optim.decay_embeddings is False and exp.name == "other"


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("optim.lrr=1e-3", "did you mean 'optim.lr'"),
        ("lr=1e-3", "did you mean 'optim.lr'"),
        ("optim.lr=fast", "expected a number"),
        ("model.n_layer=2.5", "expected an integer"),
        ("optim.decay_embeddings=maybe", "expected a boolean"),
        ("optim.lr", "key=value"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.n_layer=0", "model.n_layer must be a positive integer"),
        ("model.n_embd=130", r"model.n_embd \(130\) must be divisible by model.n_head \(4\)"),
        ("eval.temperature=-1", "eval.temperature must be a finite number >= 0"),
        ("eval.temperature=nan", "eval.temperature must be a finite number >= 0"),
        ("eval.temperature=inf", "eval.temperature must be a finite number >= 0"),
        ("eval.top_k=-1", "eval.top_k must be an integer >= 0"),
        ("eval.sample_tokens=-5", "eval.sample_tokens"),
        ("data.errors=ignore", "data.errors must be one of"),
        ("data.split_seed=-1", "data.split_seed must be an integer >= 0"),
        ("data.seed=-1", "data.seed must be an integer >= 0"),
        ("dpo.nll_weight=-1", "dpo.nll_weight must be a finite number >= 0"),
        ("reward.nll_weight=nan", "reward.nll_weight must be a finite number >= 0"),
        ("reward.first_difference_weight=-0.5", "reward.first_difference_weight must be a finite"),
        ("reward.first_difference_weight=inf", "reward.first_difference_weight must be a finite"),
    ],
)
def test_bad_overrides(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("shakespeare_char", [assignment])


def test_from_dict_round_trip_and_unknown_keys():
    exp = load_experiment("shakespeare_char", ["eval.temperature=0", "data.errors=replace"])
    assert Experiment.from_dict(exp.to_dict()) == exp
    # A run's experiment.json from another version or edited by hand: the key is named.
    d = exp.to_dict()
    d["optim"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"key optim.'lrr'; did you mean optim.lr"):
        Experiment.from_dict(d)
    with pytest.raises(ConfigError, match="unknown experiment key 'optimizer'"):
        Experiment.from_dict({**exp.to_dict(), "optimizer": {}})
    with pytest.raises(ConfigError, match="section 'model' must be an object"):
        Experiment.from_dict({"model": 3})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        Experiment.from_dict([1, 2])
    with pytest.raises(ConfigError, match="model.n_head"):  # values are validated too
        Experiment.from_dict({"model": {"n_embd": 130}})


def test_unknown_experiment_suggests():
    with pytest.raises(ConfigError, match="did you mean 'shakespeare_char'"):
        load_experiment("shakespear_char")
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment("nowhere/missing.py")


def test_experiment_file_without_experiment(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="must define EXPERIMENT"):
        load_experiment(str(path))


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "no_such_experiment"],
        ["train", "shakespeare_char", "--set", "optim.lrr=1"],
        ["train", "shakespeare_char", "--set", "schedule.max_steps=ten"],
        ["train", "shakespeare_char", "--mesh", "pipeline=2"],
        ["train", "shakespeare_char", "--set", "model.attention=flash9"],
        ["train", "shakespeare_char", "--mesh", "data=3"],  # 3 devices, but this process has 1
    ],
)
def test_cli_bad_input_exits_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxgpt train: error:") and "Traceback" not in err


def test_eval_tasks_syntax():
    """`eval.tasks` entries are FORMAT:PATH, named by the file's stem; checked when the experiment
    is built (the files themselves are read when a run starts)."""

    from jaxgpt.experiment import EvalSection, eval_tasks

    ev = EvalSection(tasks=" mc:a/quiz.jsonl, hellaswag:hs_val.jsonl ,")
    assert eval_tasks(ev) == [("quiz", "mc", Path("a/quiz.jsonl")),
                              ("hs_val", "hellaswag", Path("hs_val.jsonl"))]  # fmt: skip
    assert eval_tasks(EvalSection()) == []
    for tasks, message in [
        ("quiz.jsonl", "expected FORMAT:PATH"),
        ("mc:", "expected FORMAT:PATH"),
        ("arc:quiz.jsonl", "unknown format 'arc'"),
        ("mc:a/quiz.jsonl,hellaswag:b/quiz.jsonl", "two files named 'quiz'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Experiment(eval=EvalSection(tasks=tasks))
    with pytest.raises(ConfigError, match="eval.task_limit must be an integer >= 0"):
        Experiment(eval=EvalSection(task_limit=-1))
