"""Throughput of `jaxgpt prepare --tokenizer gpt2` against the straightforward single process.

Generates a JSONL corpus (documents cut from the bundled Shakespeare plays, shuffled, 200 to 8,000
characters each; about --mb MB), then times on it, best of --repeat runs each:

  baseline    one process: for each line, json.loads, tiktoken `encode_ordinary` of its text,
              <|endoftext|> + ids collected as uint16 arrays, written once (nanoGPT's prepare
              does this per document, per process)
  numpy       the same with tiktoken's `encode_to_numpy` (no Python int per token), as jaxgpt's
              workers tokenise: the yardstick for the parallel speed-up alone
  jaxgpt 1    `jaxgpt.data.prepare(..., tokenizer="gpt2", workers=1)`: shards + meta.json
  jaxgpt 2    the same with workers=2

and prints a Markdown table: seconds, MB/s of JSONL in, million tokens/s out, the ratios to the
baseline and to the numpy single process, and the CPU seconds used (this process and its
workers: on a busy machine, the wall time says little, the CPU time still shows jaxgpt's own
overhead). All four produce the same number of tokens (checked).

    python benchmarks/prepare_throughput.py --mb 300            # the figure in docs/data.md
    python benchmarks/prepare_throughput.py --mb 50 --repeat 1  # a quick sanity check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxgpt.data import corpus_files, prepare
from jaxgpt.tokenizer import get_tokenizer

EOT = 50256


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write a JSONL corpus of about `megabytes` MB; returns its size in bytes."""
    text = "".join(f.read_text(encoding="utf-8") for f in corpus_files("shakespeare"))
    rng = np.random.default_rng(seed)
    target = int(megabytes * 1e6)
    size = 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            lines = []
            for _ in range(1000):
                start = int(rng.integers(0, len(text) - 8000))
                end = start + int(rng.integers(200, 8000))
                lines.append(json.dumps({"text": text[start:end]}))
            block = "\n".join(lines) + "\n"
            f.write(block)
            size += len(block.encode("utf-8"))
    return path.stat().st_size


def baseline(corpus: Path, out: Path) -> int:
    """The straightforward single process; returns the number of tokens written."""
    encode = get_tokenizer("gpt2").encode_ordinary
    arrays = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            ids = encode(json.loads(line)["text"])
            arrays.append(np.array([EOT, *ids], dtype=np.uint16))
    tokens = np.concatenate(arrays)
    tokens.tofile(out / "tokens.bin")
    return len(tokens)


def baseline_numpy(corpus: Path, out: Path) -> int:
    """The same single process with tiktoken's `encode_to_numpy` (ids straight into an array,
    as jaxgpt's workers do): what one process can do at best, the yardstick of the parallel
    speed-up."""
    encoding = get_tokenizer("gpt2")
    arrays = []
    eot = np.array([EOT], np.uint16)
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            ids = encoding.encode_to_numpy(json.loads(line)["text"], disallowed_special=())
            arrays += [eot, ids.astype(np.uint16)]
    tokens = np.concatenate(arrays)
    tokens.tofile(out / "tokens.bin")
    return len(tokens)


def jaxgpt_prepare(workers: int):
    def run(corpus: Path, out: Path) -> int:
        meta = prepare(corpus, out, tokenizer="gpt2", workers=workers, progress=False)
        return meta["train_tokens"] + meta["val_tokens"]

    return run


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the workers), all threads."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB (300)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, best kept (2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        corpus = work / "corpus.jsonl"
        size = make_corpus(corpus, args.mb)
        methods = {"baseline (1 process, encode_ordinary per document)": baseline,
                   "1 process, encode_to_numpy per document": baseline_numpy,
                   "jaxgpt prepare --workers 1": jaxgpt_prepare(1),
                   "jaxgpt prepare --workers 2": jaxgpt_prepare(2)}  # fmt: skip
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(args.repeat):
            for name, method in methods.items():  # interleaved: load changes hit all alike
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                start, cpu_start = time.perf_counter(), cpu_seconds()
                counts[name] = method(corpus, out)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
                cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds() - cpu_start)
        assert len(set(counts.values())) == 1, counts
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = next(iter(counts.values()))
    base, numpy_base = (best[name] for name in list(methods)[:2])
    print(f"{size / 1e6:.0f} MB of JSONL, {tokens / 1e6:.1f}M tokens; {cpu_name()}, "
          f"{os.cpu_count()} cores; best of {args.repeat}\n")  # fmt: skip
    print(
        "| method | seconds | MB/s in | M tokens/s out | vs baseline | vs numpy 1 process | CPU s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, seconds in best.items():
        r = {"method": name, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
             "mtokens_per_s": tokens / 1e6 / seconds, "speedup": base / seconds,
             "speedup_vs_numpy": numpy_base / seconds,
             "cpu_seconds": cpu[name]}  # fmt: skip
        rows.append(r)
        print(f"| {name} | {seconds:.1f} | {r['mb_per_s']:.1f} | {r['mtokens_per_s']:.2f} | "
              f"{r['speedup']:.2f}× | {r['speedup_vs_numpy']:.2f}× | "
              f"{r['cpu_seconds']:.1f} |")  # fmt: skip
    if args.json:
        record = {"bytes": size, "tokens": tokens, "cpu": cpu_name(), "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
