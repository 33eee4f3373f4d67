"""`jaxgpt bench` through `jaxgpt.cli.main`: every workload on the tiny preset with one repeat
writes JSON rows whose figures are consistent with each other; bad input exits with code 2.

Nothing here checks speed: these tests only check that the numbers are well-formed."""

import json
import math
import os

import jax
import pytest

from jaxgpt.cli import main
from jaxgpt.cli.bench import format_rows, human

COMMON_KEYS = {
    "workload", "compile_s", "spread", "tokens_per_s", "peak_mem_gb", "peak_tflops", "device",
}  # fmt: skip
WORKLOAD_KEYS = {
    "forward": {"batch", "seq", "step_ms", "tflops", "mfu"},
    "train": {"batch", "seq", "step_ms", "tflops", "mfu"},
    "decode": {"batch", "prompt", "new_tokens", "prefill_ms", "ms_per_step", "tflops", "mfu"},
    "attention": {"backend", "pass", "seq", "batch", "median_ms"},
}
# Small shapes per workload so each compiles in a second or two.
SHAPES = {
    "forward": ["--batch", "2", "--seq", "16"],
    "train": ["--batch", "2", "--seq", "16"],
    "decode": ["--batch", "2", "--seq", "8"],
    "attention": ["--batch", "1", "--seq", "16"],
}


def bench(capsys, tmp_path, *argv):
    out_json = tmp_path / "rows.json"
    code = main(["bench", *argv, "--model", "tiny", "--steps", "1", "--json", str(out_json)])
    out, err = capsys.readouterr()
    rows = json.loads(out_json.read_text()) if code == 0 else None
    return code, rows, out, err


@pytest.mark.parametrize("workload", list(WORKLOAD_KEYS))
def test_workload_rows(capsys, tmp_path, workload):
    code, rows, out, err = bench(capsys, tmp_path, workload, *SHAPES[workload])
    assert code == 0, err
    assert rows and all(row["workload"] == workload for row in rows)
    assert "MFU is relative to a peak of" in err
    for row in rows:
        missing = (COMMON_KEYS | WORKLOAD_KEYS[workload]) - set(row)
        assert not missing, f"{workload} row lacks {missing}"
        assert row["compile_s"] > 0
        assert 0 < row["peak_mem_gb"] < 1e3
        if jax.devices()[0].platform == "cpu":  # the CPU model and cores are in the report
            assert row["device"].endswith(f"{os.cpu_count()} cores")
        assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"])
        if "mfu" in row:  # NaN both when a loaded machine's timing noise hid the decode step
            ratio = row["tflops"] / row["peak_tflops"]
            assert row["mfu"] == pytest.approx(ratio, rel=1e-6, nan_ok=True)
    if workload in ("forward", "train"):
        (row,) = rows
        assert (row["batch"], row["seq"]) == (2, 16)
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["step_ms"] / 1e3), rel=1e-6)
    if workload == "decode":
        (row,) = rows
        assert (row["batch"], row["prompt"], row["new_tokens"]) == (2, 8, 56)
        assert row["decode_tokens_per_s"] == pytest.approx(2e3 / row["ms_per_step"], rel=1e-6)
    if workload == "attention":
        assert {row["backend"] for row in rows} >= {"xla"}
        assert all(row["max_err_vs_xla"] < 1e-4 for row in rows if row["pass"] == "fwd")
        assert {row["pass"] for row in rows} == {"fwd", "fwd+bwd"}
    # The table on stdout shows the same rows.
    assert out.count("\n") >= len(rows) + 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["forward", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--batch", "0"], "--batch must be >= 1"),
        (["forward", "--seq", "-3"], "--seq must be >= 1"),
        (["decode", "--model", "tinyy"], "unknown preset 'tinyy'"),
        (["decode", "--model", "tiny", "--seq", "64"], "--seq 64 is too long for decode"),
        (["forward", "--model", "tiny", "--seq", "65"], "(block_size 64): at most 64"),
        (["all", "--json", "/nonexistent/dir/out.json"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    code = main(["bench", *argv])
    _, err = capsys.readouterr()
    assert code == 2
    # One line: every check runs before the benchmark prints its header or times anything.
    (line,) = err.splitlines()
    assert line.startswith("jaxgpt bench: error:") and message in line
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "value, text",
    [
        (497123.4, "497,100"),
        (4.971e05, "497,100"),
        (999.96, "1,000"),
        (12.3456, "12.35"),
        (0.00123, "0.00123"),
        (1.234e-05, "1.234e-05"),
        (124439808, "124,439,808"),
        (8, "8"),
        (-2500.0, "-2,500"),
        (0.0, "0"),
    ],
)
def test_numbers_are_human_readable(value, text):
    assert human(value) == text


def test_table_prints_readable_numbers():
    table = format_rows([{"model": "gpt2", "batch": 8, "tokens_per_s": 497123.4, "mfu": 0.0123}])
    header, rule, row = table.splitlines()
    assert header.split() == ["model", "batch", "tokens_per_s", "mfu"]
    assert set(rule) == {"-"}
    assert row.split() == ["gpt2", "8", "497,100", "0.0123"]
    assert "e+" not in table
