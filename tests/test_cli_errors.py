"""Every `jaxgpt` command given bad input, as a user runs it (a subprocess): exit code 2, exactly
one line on stderr naming the problem, no traceback, and every file of an existing run unchanged.

The inputs are built once per module (a finished 5-step tiny run, tiny Hugging Face directories,
broken copies of them); the commands then run two at a time, and each case checks its own result.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest

from jaxgpt.cli import COMMANDS
from jaxgpt.config import GPTConfig
from jaxgpt.data import prepare
from jaxgpt.experiment import load_experiment
from jaxgpt.params import init_params
from jaxgpt.pretrained import save_hf
from jaxgpt.train import run
from tests.conftest import TINY_EXPERIMENT, TINY_PPO_EXPERIMENT, write_tiny_run
from tests.test_reward_model import reward_run_from

# Run a command with the `hf` extra's packages made unimportable (as on `pip install jaxgpt`).
WITHOUT_HF = (
    "import sys\n"
    "for name in ('safetensors', 'safetensors.numpy', 'torch', 'transformers'):\n"
    "    sys.modules[name] = None  # `import name` now raises ImportError\n"
    "from jaxgpt.cli import main\n"
    "sys.exit(main())\n"
)


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # after `jaxgpt`; "{w}" stands for the world directory
    message: str  # a piece of the one stderr line
    keeps: tuple[str, ...] = ()  # world subdirectories that must be unchanged afterwards
    without_hf: bool = False


def case(name, argv, message, keeps=(), without_hf=False) -> Case:
    return Case(name, tuple(argv.split()), message, tuple(keeps), without_hf)


RUN = ("run",)
PPO = ("ref", "ppo_rm")  # the frozen models a PPO run reads
# fmt: off
CASES = [
    # prepare
    case("prepare-missing-source", "prepare {w}/nope.txt {w}/data2", "does not exist"),
    case("prepare-parent-is-a-file", "prepare {w}/corpus.txt {w}/afile/data", "cannot create"),
    case("prepare-out-is-a-file", "prepare {w}/corpus.txt {w}/afile", "cannot create"),
    case("prepare-not-utf8", "prepare {w}/latin1.txt {w}/data3 --quiet", "byte offset 10"),
    case("prepare-one-piece", "prepare {w}/short.txt {w}/data4 --quiet", "smaller split_chunk"),
    case("prepare-val-fraction", "prepare {w}/corpus.txt {w}/data5 --val-fraction 1.5", "(0, 1)"),
    case("prepare-split-chunk", "prepare {w}/corpus.txt {w}/data8 --split-chunk 0",
         "split_chunk must be an integer >= 1"),
    case("prepare-split-seed", "prepare {w}/corpus.txt {w}/data9 --split-seed -1",
         "split_seed must be an integer >= 0"),
    case("prepare-empty", "prepare {w}/empty.txt {w}/data6", "is empty"),
    case("prepare-bad-errors", "prepare {w}/corpus.txt {w}/data7 --errors ignore",
         "invalid choice"),
    # prepare, GPT-2 documents: each into its own copy of good prepared data, left as it was
    case("prepare-bad-json", "prepare {w}/bad.jsonl {w}/bpe1 --tokenizer gpt2 --quiet",
         "bad.jsonl:2: not valid JSON", keeps=("bpe1",)),
    case("prepare-missing-field", "prepare {w}/docs.jsonl {w}/bpe2 --tokenizer gpt2 --quiet "
         "--field body", "docs.jsonl:1: no 'body' field", keeps=("bpe2",)),
    case("prepare-corrupt-gz", "prepare {w}/cut.jsonl.gz {w}/bpe3 --tokenizer gpt2 --quiet",
         "cut.jsonl.gz: a corrupt or truncated gzip file", keeps=("bpe3",)),
    case("prepare-one-document", "prepare {w}/corpus.txt {w}/bpe4 --tokenizer gpt2 --quiet",
         "has 1 document(s)", keeps=("bpe4",)),
    case("prepare-corrupt-parquet", "prepare {w}/bad.parquet {w}/bpe5 --tokenizer gpt2 --quiet",
         "not a readable Parquet file", keeps=("bpe5",)),
    case("prepare-workers-0", "prepare {w}/docs.jsonl {w}/bpe6 --tokenizer gpt2 --workers 0",
         "workers must be an integer >= 1", keeps=("bpe6",)),
    # train: every bad setting fails before any work, and an existing run is left alone
    case("train-unknown-experiment", "train nosuch_experiment", "unknown experiment"),
    case("train-unknown-key", "train {w}/tiny.py --set optim.lrr=1", "did you mean 'optim.lr'"),
    case("train-bad-number", "train {w}/tiny.py --set optim.lr=fast", "expected a number"),
    case("train-n-layer-0", "train {w}/tiny.py --out {w}/run --set model.n_layer=0",
         "model.n_layer must be a positive integer", RUN),
    case("train-n-embd-n-head", "train {w}/tiny.py --out {w}/run --set model.n_embd=33",
         "model.n_embd (33) must be divisible by model.n_head (2)", RUN),
    case("train-eval-temperature", "train {w}/tiny.py --out {w}/run --set eval.temperature=-1",
         "eval.temperature", RUN),
    case("train-eval-temperature-nan", "train {w}/tiny.py --set eval.temperature=nan",
         "eval.temperature"),
    case("train-eval-top-k", "train {w}/tiny.py --out {w}/run --set eval.top_k=-3",
         "eval.top_k", RUN),
    case("train-data-seed", "train {w}/tiny.py --set data.seed=-2", "data.seed must be"),
    case("train-data-errors", "train {w}/tiny.py --set data.errors=ignore", "data.errors"),
    case("train-bad-mesh", "train {w}/tiny.py --out {w}/run --mesh data=x", "mesh", RUN),
    case("train-changed-shape", "train {w}/tiny.py --out {w}/run --data-dir {w}/data "
         "--set model.n_layer=3", "model.n_layer", RUN),
    case("train-experiment-unknown-key", "train {w}/tiny.py --out {w}/run_unknownkey "
         "--data-dir {w}/data", "unknown experiment key optim.'lrr'", ("run_unknownkey",)),
    case("train-experiment-not-json", "train {w}/tiny.py --out {w}/run_notjson "
         "--data-dir {w}/data", "experiment.json", ("run_notjson",)),
    case("train-fresh-bad-init", "train {w}/tiny.py --out {w}/run --data-dir {w}/data --fresh "
         "--set model.init={w}/typo", "model.init", RUN),
    # train a PPO policy (data.format=prompts): its frozen models are checked before any write
    case("train-ppo-no-reference", "train {w}/ppo.py --out {w}/ppo_run --set rl.reference=",
         "needs a reference policy", PPO),
    case("train-ppo-rm-tokenizer", "train {w}/ppo.py --out {w}/ppo_run "
         "--set rl.reward_model={w}/rm_other", "reward model reads another table", PPO),
    case("train-ppo-rm-as-policy", "train {w}/ppo.py --out {w}/ppo_run --set model.init={w}/ppo_rm",
         "is a reward model; it cannot start a PPO policy", PPO),
    case("train-ppo-policy-as-rm", "train {w}/ppo.py --out {w}/ppo_run "
         "--set rl.reward_model={w}/ref", "it must be a reward model", PPO),
    case("train-ppo-rm-as-reference", "train {w}/ppo.py --out {w}/ppo_run "
         "--set rl.reference={w}/ppo_rm", "rl.reference", PPO),
    case("train-eval-task-format", "train {w}/tiny.py --out {w}/run --data-dir {w}/data "
         "--set eval.tasks=quiz:{w}/mc_ok.jsonl", "unknown format 'quiz'", RUN),
    case("train-eval-task-missing", "train {w}/tiny.py --out {w}/run --data-dir {w}/data "
         "--set eval.tasks=mc:{w}/nope.jsonl", "no such file", RUN),
    case("train-eval-task-label", "train {w}/tiny.py --out {w}/run --data-dir {w}/data "
         "--set eval.tasks=mc:{w}/mc_ok.jsonl,mc:{w}/mc_label.jsonl", "mc_label.jsonl:2: 'answer'",
         RUN),
    case("train-eval-task-chars", "train {w}/tiny.py --out {w}/run --data-dir {w}/data "
         "--set eval.tasks=mc:{w}/mc_chars.jsonl", "mc_chars.jsonl:1: characters ['€']", RUN),
    # eval
    case("eval-json-missing-dir", "eval --model {w}/run --data {w}/data/tiny "
         "--json {w}/nope/out.json", "does not exist", RUN),
    # chat
    case("chat-no-chat-tokens", "chat --model {w}/run --prompt hi", "no chat tokens", RUN),
    case("chat-input-missing", "chat --model {w}/run --input {w}/nope.jsonl --output "
         "{w}/answers.jsonl", "is not a file", RUN),
    # pairs
    case("pairs-no-chat-tokens", "pairs --model {w}/run --out {w}/pairs.jsonl --n-prompts 2",
         "no chat tokens", RUN),
    case("pairs-samples-1", "pairs --model {w}/run --out {w}/pairs.jsonl --samples 1",
         "--samples must be at least 2"),
    # explore
    case("explore-missing-model", "explore --model {w}/nowhere", "does not exist"),
    # launch
    case("launch-processes-0", "launch --processes 0 -- train {w}/tiny.py",
         "--processes must be at least 1"),
    # sample
    case("sample-prompt-not-utf8", "sample --model {w}/run --prompt-file {w}/latin1.txt",
         "not UTF-8", RUN),
    case("sample-prompt-file-missing", "sample --model {w}/run --prompt-file {w}/nope.txt",
         "cannot read --prompt-file", RUN),
    case("sample-hf-no-weights", "sample --model {w}/hf_noweights", "no model.safetensors"),
    case("sample-hf-truncated", "sample --model {w}/hf_truncated", "cannot read"),
    case("sample-hf-without-extra", "sample --model {w}/hf --max-new-tokens 2",
         "pip install 'jaxgpt[hf]'", without_hf=True),
    case("sample-checkpoint-cut-short", "sample --model {w}/run_truncated", "checkpoint",
         ("run_truncated",)),
    case("sample-preset-vocab", "sample --model tiny", "vocab_size 512"),
    case("sample-temperature-nan", "sample --model {w}/run --temperature nan",
         "finite number", RUN),
    case("sample-top-k-0", "sample --model {w}/run --top-k 0", "top_k", RUN),
    case("sample-top-p", "sample --model {w}/run --top-p 1.5", "top_p", RUN),
    case("sample-unknown-char", "sample --model {w}/run --prompt \u20ac", "not in this", RUN),
    case("sample-missing-model", "sample --model {w}/nowhere", "does not exist"),
    case("sample-max-new-tokens", "sample --model {w}/run --prompt abc --max-new-tokens 0",
         "max-new-tokens", RUN),
    # trace
    case("trace-layer", "trace --model {w}/run --prompt the --layer 9", "layer", RUN),
    case("trace-temperature-nan", "trace --model {w}/run --prompt the --temperature nan",
         "finite number", RUN),
    case("trace-hf-truncated", "trace --model {w}/hf_truncated --prompt the", "cannot read"),
    case("trace-out-is-a-file", "trace --model {w}/run --prompt the --out {w}/afile/x",
         "is a file, not a directory", RUN),
    case("trace-compare-other-tokenizer", "trace --model {w}/run --compare {w}/hf --prompt hi "
         "--answer yo --html {w}/answer.html", "another tokenizer", RUN),
    # plot
    case("plot-missing-dir", "plot {w}/run --out {w}/nowhere/loss.png", "does not exist", RUN),
    case("plot-unknown-extension", "plot {w}/run --out {w}/loss.xyz", "unknown file type", RUN),
    case("plot-not-a-run", "plot {w}/hf", "no metrics.jsonl"),
    case("plot-a-file", "plot {w}/empty.txt", "no metrics.jsonl"),
    # params
    case("params-unknown-preset", "params gpt3", "unknown preset"),
    # bench: the output path is checked before anything is timed
    case("bench-json-missing-dir", "bench forward --json {w}/nowhere/out.json", "does not exist"),
    case("bench-unknown-preset", "bench forward --model gpt3", "unknown preset"),
    case("bench-seq-too-long", "bench forward --seq 100000", "--seq 100000 is too long"),
    case("bench-steps", "bench forward --steps 0", "--steps"),
    # score: a reward model's scores; a policy, bad lines and unencodable text are refused
    case("score-policy-as-reward-model", "score --model {w}/run --input {w}/pairs.jsonl",
         "this command needs a reward model", RUN),
    case("score-missing-rejected", "score --model {w}/rm --input {w}/pairs_missing.jsonl",
         'pairs_missing.jsonl:2: missing "rejected"', ("rm",)),
    case("score-other-tokenizer", "score --model {w}/rm --input {w}/pairs_euro.jsonl",
         "pairs_euro.jsonl:1: the reward model's char tokenizer cannot encode", ("rm",)),
    case("score-input-missing", "score --model {w}/rm --input {w}/nope.jsonl", "is not a file",
         ("rm",)),
    case("score-output-missing-dir", "score --model {w}/rm --input {w}/pairs.jsonl --output "
         "{w}/nowhere/scores.jsonl", "does not exist", ("rm",)),
]
# fmt: on


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _build_world(w: Path, corpus: Path) -> None:
    """The inputs the cases refer to, under `w`."""
    exp_file = w / "tiny.py"
    exp_file.write_text(
        TINY_EXPERIMENT.format(source=str(corpus), steps=6, eval_interval=6, ckpt_interval=6)
    )
    exp = load_experiment(str(exp_file))
    run(exp, run_dir=w / "run", data_root=w / "data", progress=False, sample=False)
    for name, change in [("run_notjson", "{not json"), ("run_unknownkey", None)]:
        shutil.copytree(w / "run", w / name)
        path = w / name / "experiment.json"
        if change is None:
            d = json.loads(path.read_text())
            d["optim"]["lrr"] = 1.0
            change = json.dumps(d)
        path.write_text(change)
    shutil.copytree(w / "run", w / "run_truncated")  # every checkpoint array file cut in half
    for path in (w / "run_truncated" / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 1024:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_hf(config, init_params(config, jax.random.key(0)), w / "hf")
    (w / "hf_noweights").mkdir()
    shutil.copy(w / "hf" / "config.json", w / "hf_noweights")
    shutil.copytree(w / "hf", w / "hf_truncated")
    weights = w / "hf_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    reward_run_from(w / "run", w / "rm")  # a reward model started from the run (not trained)
    pair = {"prompt": "To be", "chosen": "or not", "rejected": "to be"}
    for name, lines in [
        ("pairs", [pair]),
        ("pairs_missing", [pair, {"prompt": "To be", "chosen": "or not"}]),
        ("pairs_euro", [{**pair, "chosen": "or \u20ac"}]),
    ]:
        (w / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    write_tiny_run(w / "ref", "lm")
    write_tiny_run(w / "ppo_rm", "reward", seed=1)
    write_tiny_run(w / "rm_other", "reward", chars="0123456789+= ")
    ppo = TINY_PPO_EXPERIMENT.format(ref=str(w / "ref"), rm=str(w / "ppo_rm"), steps=2)
    (w / "ppo.py").write_text(ppo)

    shutil.copy(corpus, w / "corpus.txt")
    (w / "latin1.txt").write_bytes("Romeo\n caf\u00e9\n".encode("latin-1"))  # é at byte 10
    (w / "short.txt").write_text("To be, or not to be.\n" * 5)
    (w / "empty.txt").write_text("")
    (w / "afile").write_text("a file, not a directory\n")
    docs = [json.dumps({"text": f"Document {i}: to be, or not to be."}) for i in range(40)]
    (w / "docs.jsonl").write_text("\n".join(docs) + "\n")
    (w / "bad.jsonl").write_text(docs[0] + "\n{not json}\n")
    whole = gzip.compress((w / "docs.jsonl").read_bytes())
    (w / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (w / "bad.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    prepare(w / "docs.jsonl", w / "bpe1", tokenizer="gpt2", workers=1, progress=False)
    for i in range(2, 7):
        shutil.copytree(w / "bpe1", w / f"bpe{i}")
    ok = json.dumps({"context": "To be, or not to", "choices": ["be", "go"], "answer": 0})
    (w / "mc_ok.jsonl").write_text(ok + "\n")
    (w / "mc_label.jsonl").write_text(ok + "\n" + ok.replace('"answer": 0', '"answer": 2') + "\n")
    (w / "mc_chars.jsonl").write_text(ok.replace("go", "\u20ac") + "\n", encoding="utf-8")


def _run_case(c: Case, w: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{w}", str(w)) for a in c.argv]
    head = ["-c", WITHOUT_HF] if c.without_hf else ["-m", "jaxgpt"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path.cwd())}
    return subprocess.run(
        [sys.executable, *head, *args],
        capture_output=True,
        text=True,
        cwd=w,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_corpus):
    """(world dir, {case name: completed process}, hashes before, hashes after)."""
    w = tmp_path_factory.mktemp("cli_errors")
    _build_world(w, tiny_corpus)
    kept = {k for c in CASES for k in c.keeps}
    before = {k: _tree_hash(w / k) for k in kept}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip([c.name for c in CASES], pool.map(lambda c: _run_case(c, w), CASES)))
    after = {k: _tree_hash(w / k) for k in kept}
    return w, done, before, after


def test_enough_cases_and_every_command_covered():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} == set(COMMANDS)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(results, c):
    _, done, before, after = results
    proc = done[c.name]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"jaxgpt {c.argv[0]}: error: "), lines[0]
    assert c.message in lines[0], lines[0]
    for k in c.keeps:
        assert before[k] and after[k] == before[k], f"{k} changed"


def test_the_same_run_works_with_good_input(results):
    """Control: the run the cases use is sound, so they fail for their bad input alone. Without
    --prompt a character-level run starts from a newline (it has no <|endoftext|>)."""
    w, _, before, _ = results
    proc = _run_case(case("good", "sample --model {w}/run --max-new-tokens 5", ""), w)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == len("\n") + 5 + 1  # the prompt, 5 characters, print's newline
    assert _tree_hash(w / "run") == before["run"]
