"""`benchmarks/device_check.sh`: its CPU dry run (the same steps as on a GPU, with the Pallas
interpreter and tiny shapes) passes and writes the merged JSON; a failing step stops the script
with a non-zero exit that names it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")


def run_script(*args, python=sys.executable, timeout=1500):
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_dry_run_passes_every_step_and_writes_one_json(tmp_path):
    # About a minute on two idle cores; the limit allows for a shared machine (the script's own
    # total limit is 1410 s in a dry run).
    result = run_script("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"] is True
    # The kernels were compared with the XLA reference, in the interpreter (CPU).
    assert report["kernels"] and all(r["ok"] and r["interpreted"] for r in report["kernels"])
    assert {r["check"].split(":")[0] for r in report["kernels"]} >= {
        "flash-tail-left-padded-f32", "decode-ragged-S100", "model-decode-step-pallas-vs-xla"
    }  # fmt: skip
    assert {(r["backend"], r["pass"]) for r in report["attention"]} == {
        (b, p) for b in ("xla", "pallas") for p in ("fwd", "fwd+bwd")
    }
    (train,) = report["train"]
    assert train["dtype"] == "bfloat16" and train["tokens_per_s"] > 0
    assert {(r["batch"], r["weights"]) for r in report["decode"]} == {
        (b, w) for b in (1, 8) for w in ("float32", "bfloat16")
    }
    assert "train MFU" in result.stdout and "decode batch 1" in result.stdout


def test_a_failing_step_stops_the_script_and_names_it(tmp_path):
    # A python that cannot import JAX fails the first step; nothing after it runs.
    result = run_script("--dry-run", "--out", str(tmp_path), python="false", timeout=60)
    assert result.returncode == 1
    assert "FAILED at step 'env'" in result.stderr
    assert not (tmp_path / "kernels.json").exists()


def test_unknown_argument_is_one_line_and_exit_2():
    result = run_script("--gpus", "2", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "device_check: error: unknown argument '--gpus' (expected --dry-run, --out DIR)"
    )


def test_report_fails_loudly_on_a_missing_row(tmp_path):
    """The report step refuses an incomplete set of results rather than summarising it."""
    kernels = [{"check": "x", "max_err": 0.0, "bound": 1.0, "ok": True, "interpreted": True}]
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    row = {"backend": "xla", "seq": 16, "tokens_per_s": 1.0, "max_err_vs_xla": 0.0}
    rows = [{**row, "pass": "fwd"}, {**row, "pass": "fwd+bwd"}]  # no pallas rows
    (tmp_path / "attention_T16.json").write_text(json.dumps(rows))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check_report.py"), str(tmp_path),
         "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "attention T=16 pallas fwd: row missing" in result.stderr
