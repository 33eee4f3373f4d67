"""scripts/assistant_pipeline.py: the figures it reads from each stage's report.json, its table,
and its refusal to run where runs already are (the stages themselves are tested with their
modules; the whole pipeline is timed in docs/chat.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "assistant_pipeline.py"


@pytest.fixture(scope="module")
def pipeline():
    spec = importlib.util.spec_from_file_location("assistant_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_figures_read_each_kind_of_report(pipeline):
    held_out = {"accuracy": 0.86, "stderr": 0.0155, "n": 500}
    sft = pipeline.stage_figures({"stage": "sft", "held_out": held_out, "train_wall_s": 130.8})
    assert sft["held_out_accuracy"] == 0.86 and sft["kl_to_sft"] == 0.0
    assert sft["rm_pair_accuracy"] is None and sft["train_wall_s"] == 130.8
    dpo = pipeline.stage_figures({"stage": "dpo", "held_out": held_out,
                                  "dpo": {"kl_to_reference": {"mean": 0.32, "stderr": 0.06,
                                                              "n": 500}}})  # fmt: skip
    assert dpo["kl_to_sft"] == 0.32
    ppo = pipeline.stage_figures({"stage": "ppo", "held_out": held_out,
                                  "ppo": {"rollout_kl": 0.07}})  # fmt: skip
    assert ppo["kl_to_sft"] == 0.07
    rm = pipeline.stage_figures(
        {"stage": "reward", "reward": {"held_out_pairs": {"accuracy": 0.859, "stderr": 0.018}}}
    )
    assert rm["rm_pair_accuracy"] == 0.859 and rm["held_out_accuracy"] is None
    assert rm["kl_to_sft"] is None


def test_table_has_a_row_per_stage_and_the_total(pipeline):
    rows = [
        {"stage": "SFT", "wall_s": 170.0,
         "figures": {"held_out_accuracy": 0.86, "held_out_stderr": 0.0155, "kl_to_sft": 0.0}},
        {"stage": "preference pairs", "wall_s": 134.0},
        {"stage": "reward model", "wall_s": 500.0,
         "figures": {"rm_pair_accuracy": 0.859, "rm_pair_stderr": 0.0177}},
    ]  # fmt: skip
    lines = pipeline.table(rows).splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[2] == "| SFT | 86.0 % ± 1.6 | — | 0.00 | 170 s |"
    assert lines[3] == "| preference pairs | — | — | — | 134 s |"
    assert lines[4] == "| reward model | — | 85.9 % ± 1.8 | — | 500 s |"
    assert lines[5] == "| **all** | | | | **804 s (13.4 min)** |"


def test_a_used_workdir_is_refused_untouched(pipeline, tmp_path, capsys):
    run = tmp_path / "runs" / "chat_sft"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"stage": "sft"}))
    before = (run / "report.json").read_bytes()
    assert pipeline.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workdir" in err[0] and "not an empty directory" in err[0]
    assert (run / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_dry_run_lists_every_stage_in_order(pipeline, capsys):
    assert pipeline.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["train", "chat_sft"], ["pairs", "--model"], ["train", "chat_dpo"],
        ["train", "chat_rm"], ["train", "chat_ppo"],
    ]  # fmt: skip


def test_table_is_printed_again_from_a_workdir(pipeline, tmp_path, capsys):
    (tmp_path / "runs" / "chat_dpo").mkdir(parents=True)
    report = {"stage": "dpo", "held_out": {"accuracy": 0.944, "stderr": 0.0103},
              "dpo": {"kl_to_reference": {"mean": 0.315, "stderr": 0.06, "n": 500}}}  # fmt: skip
    (tmp_path / "runs" / "chat_dpo" / "report.json").write_text(json.dumps(report))
    rows = [{"stage": "DPO + NLL", "command": "jaxgpt train chat_dpo", "wall_s": 62.4}]
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": rows}))
    assert pipeline.main(["--workdir", str(tmp_path), "--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| DPO + NLL | 94.4 % ± 1.0 | — | 0.32 | 62 s |"
    assert pipeline.main(["--workdir", str(tmp_path / "none"), "--table"]) == 2
    assert "holds no pipeline.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("returncode", "want_exit", "want"),
    [(130, 130, "interrupted; runs are in"), (2, 1, "`jaxgpt train chat_rm` failed (exit 2)")],
)
def test_a_stage_that_fails_or_is_interrupted_stops_with_one_line(
    pipeline, tmp_path, capsys, monkeypatch, returncode, want_exit, want
):
    command = [sys.executable, "-m", "jaxgpt", "train", "chat_rm"]

    def failing(workdir, **kwargs):
        raise subprocess.CalledProcessError(returncode, command)

    monkeypatch.setattr(pipeline, "run_pipeline", failing)
    assert pipeline.main(["--workdir", str(tmp_path / "new")]) == want_exit
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0]
