"""Rebuild the example trace shown in docs/trace.md (no downloads).

Builds a tiny GPT-2 with transformers (GPT-2's 50257-token vocabulary, 2 layers, 4 heads, width
64, RANDOM weights drawn with std 0.1 so the attention patterns are not flat), saves it as a
Hugging Face directory, runs `jaxgpt trace` on it, and copies the report and two heatmaps into
docs/.

    PYTHONPATH=. python docs/trace_example.py     (from the repository root)
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from jaxgpt.cli import main

PROMPT = "Hola mundo. Esta es una prueba de tokenización real."
DOCS = Path(__file__).resolve().parent


def build_tiny_gpt2(directory: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out_dir = Path(tmp) / "tiny-gpt2", Path(tmp) / "trace"
        build_tiny_gpt2(model_dir)
        argv = ["trace", "--model", str(model_dir), "--prompt", PROMPT]
        argv += ["--layer", "1", "--head", "2", "--out", str(out_dir)]
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        if status != 0:
            raise SystemExit(f"jaxgpt trace failed with exit code {status}")
        report = (out_dir / "report.txt").read_text(encoding="utf-8")
        # The temporary directory's name is not worth committing.
        report = report.replace(str(model_dir), "tiny-gpt2 (random weights, std 0.1)")
        (DOCS / "trace_example_report.txt").write_text(report, encoding="utf-8")
        shutil.copy(out_dir / "attention_layer1_head2.png", DOCS / "trace_attention.png")
        shutil.copy(out_dir / "attention_layers_mean.png", DOCS / "trace_attention_layers.png")
    print(f"wrote {DOCS / 'trace_example_report.txt'}, trace_attention.png, "
          f"trace_attention_layers.png")  # fmt: skip


if __name__ == "__main__":
    run()
