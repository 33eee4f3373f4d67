"""GPT-2 corpora as documents: every input format, the split by document, worker-count invariance,
resumable shards, and llm.c shards as training data. Tokens are checked against tiktoken."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import sys

import numpy as np
import pytest

from jaxgpt import atomic, batches, documents, sharded
from jaxgpt.data import get_batch, load_meta, load_tokens, prepare
from jaxgpt.errors import ConfigError, InputError, MissingExtraError
from jaxgpt.shards import TokenStream, read_shard
from jaxgpt.tokenizer import get_tokenizer
from tests.test_shards import llmc_shard

EOT = 50256
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of varied length, some with non-ASCII text and newlines, some with the text
    "<|endoftext|>" (tokenised as ordinary text, never as the separator)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 60)))
        tail = " café ☕\n\nend." if i % 5 == 0 else "."
        if i % 7 == 3:  # the special token's text is ordinary text in a document
            tail += " <|endoftext|> is text here."
        docs.append(f"Doc {i}: " + " ".join(words) + tail)
    return docs


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


def split_documents(tokens) -> list[list[int]]:
    """A split's stream cut at each <|endoftext|>: the documents it holds, in order."""
    tokens = list(np.asarray(tokens))
    assert tokens[0] == EOT  # every document is preceded by EOT, the first one too
    starts = [i for i, t in enumerate(tokens) if t == EOT] + [len(tokens)]
    return [tokens[a + 1 : b] for a, b in itertools.pairwise(starts)]


def check_documents(out, docs) -> dict:
    """Each split holds whole documents, in corpus order, tokenised exactly as tiktoken does; the
    two splits together hold every document once."""
    enc = get_tokenizer("gpt2")
    expected = [enc.encode_ordinary(d) for d in docs]
    got = {s: split_documents(load_tokens(out, s)) for s in ("train", "val")}
    meta = load_meta(out)
    assert [len(got["train"]), len(got["val"])] == [meta["train_documents"], meta["val_documents"]]
    # Merge back in corpus order: walk the expected documents, taking each from one split.
    i = {"train": 0, "val": 0}
    for ids in expected:
        split = "train" if got["train"][i["train"] :][:1] == [ids] else "val"
        assert got[split][i[split]] == ids
        i[split] += 1
    assert i == {"train": len(got["train"]), "val": len(got["val"])}
    assert got["train"][0] == expected[0] and got["val"][0] == expected[1]
    return meta


def hashes(directory) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_jsonl_gz_txt_and_parquet_documents(tmp_path):
    docs = make_docs(40)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", docs[:10])
    write_jsonl(corpus / "b.jsonl.gz", docs[10:20], opener=gzip.open)
    for i, d in enumerate(docs[20:30]):
        (corpus / "sub" / f"c{i}.txt").write_text(d, encoding="utf-8")
    pa = pytest.importorskip("pyarrow")  # the `parquet` extra; scripts/setup.sh installs it
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[30:], "n": list(range(10))}), corpus / "d.parquet",
                   row_group_size=3)  # fmt: skip
    (corpus / ".hidden.jsonl").write_text("not json\n")  # hidden files are not corpus files
    (corpus / "notes.md").write_text("not a corpus format\n")
    meta = prepare(corpus, tmp_path / "out", tokenizer="gpt2", workers=1, progress=False)
    # Files in sorted path order: a.jsonl, b.jsonl.gz, d.parquet, sub/c0.txt ... sub/c9.txt.
    order = docs[:20] + docs[30:] + [docs[20 + i] for i in range(10)]
    check_documents(tmp_path / "out", order)
    assert [f["name"].split("/")[-1] for f in meta["files"]][:3] == [
        "a.jsonl",
        "b.jsonl.gz",
        "d.parquet",
    ]
    assert meta["eot_placement"] == "prepend" and meta["format"] == "shards"
    # A glob picks the same files the directory gave, here only the JSONL ones.
    prepare(str(corpus / "*.jsonl*"), tmp_path / "g", tokenizer="gpt2", workers=1,
            progress=False)  # fmt: skip
    check_documents(tmp_path / "g", docs[:20])


def test_field_and_missing_policy(tmp_path, capsys):
    docs = make_docs(12)
    path = write_jsonl(tmp_path / "a.jsonl", docs, field="content")
    with pytest.raises(InputError, match=r"a\.jsonl:1: no 'text' field.*--field"):
        prepare(path, tmp_path / "o", tokenizer="gpt2", workers=1, progress=False)
    prepare(path, tmp_path / "o", tokenizer="gpt2", field="content", workers=1, progress=False)
    check_documents(tmp_path / "o", docs)

    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"title": "no content here"})
    lines[7] = json.dumps({"content": None})
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is not a document
    with pytest.raises(InputError, match=r"a\.jsonl:4: no 'content' field"):
        prepare(path, tmp_path / "o", tokenizer="gpt2", field="content", workers=1, progress=False)
    meta = prepare(path, tmp_path / "o", tokenizer="gpt2", field="content", missing="skip",
                   workers=1, progress=False)  # fmt: skip
    assert meta["skipped_documents"] == 2
    assert "skipped 2 line(s) without a 'content' field (the first: " in capsys.readouterr().err
    check_documents(tmp_path / "o", [d for i, d in enumerate(docs) if i not in (3, 7)])


def test_bad_input_names_file_and_line(tmp_path):
    docs = make_docs(30)
    good = write_jsonl(tmp_path / "good.jsonl.gz", docs, opener=gzip.open)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken}\n')
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"text": "fine"}\n["text"]\n')
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": "fine"}\n{"text": 7}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    cases = [
        (cut, r"cut\.jsonl\.gz: a corrupt or truncated gzip file"),
        (bad_json, r"bad\.jsonl:3: not valid JSON"),
        (not_object, r"list\.jsonl:2: a JSON list, expected an object"),
        (number, r"number\.jsonl:2: field 'text' is a JSON int, expected a string"),
        (latin1, r"latin1\.jsonl:2: not valid UTF-8"),
        (tmp_path / "nope.jsonl", "does not exist"),
        (str(tmp_path / "*.nothing"), "no corpus file"),
    ]
    out = tmp_path / "out"
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            prepare(path, out, tokenizer="gpt2", workers=1, progress=False)
        assert not list(out.iterdir())  # nothing half-written, nothing to resume
    with pytest.raises(InputError, match=r"a \.jsonl corpus of documents: .* --tokenizer gpt2"):
        prepare(bad_json, out, progress=False)  # the char tokenizer reads .txt
    (tmp_path / "shards").mkdir()
    llmc_shard(tmp_path / "shards" / "fineweb_val_000000.bin", [1, 2, 3])
    with pytest.raises(InputError, match="it holds .bin token shards: use it as the data dir"):
        prepare(tmp_path / "shards", out, tokenizer="gpt2", progress=False)
    meta = prepare(latin1, out, tokenizer="gpt2", errors="replace", workers=1, progress=False)
    assert meta["replaced_invalid_utf8"] == 1


def test_parquet_errors(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": make_docs(5)}), path)
    with pytest.raises(InputError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        prepare(path, tmp_path / "o", tokenizer="gpt2", workers=1, progress=False)
    (tmp_path / "bad.parquet").write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        prepare(tmp_path / "bad.parquet", tmp_path / "o", tokenizer="gpt2", field="body",
                workers=1, progress=False)  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as without the `parquet` extra
    with pytest.raises(MissingExtraError, match=r"needs pyarrow: pip install 'jaxgpt\[parquet\]'"):
        prepare(path, tmp_path / "o", tokenizer="gpt2", field="body", workers=1, progress=False)


def test_split_by_document_is_seeded_and_never_empty(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(200))

    def run(name, seed):
        meta = prepare(path, tmp_path / name, tokenizer="gpt2", split_seed=seed,
                       val_fraction=0.2, workers=1, chunk_bytes=1000, progress=False)  # fmt: skip
        return meta["val_documents"], hashes(tmp_path / name)

    assert run("a", 0) == run("b", 0)
    assert run("a", 0)[1] != run("c", 1)[1]
    assert 20 < run("a", 0)[0] < 60  # about val_fraction of 200 documents
    two = write_jsonl(tmp_path / "two.jsonl", ["first", "second"])
    meta = prepare(two, tmp_path / "two", tokenizer="gpt2", val_fraction=0.01, workers=1,
                   progress=False)  # fmt: skip
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(InputError, match=r"has 1 document\(s\).* at least 2"):
        prepare(tmp_path / "one.txt", tmp_path / "one", tokenizer="gpt2", workers=1,
                progress=False)  # fmt: skip


def test_same_bytes_for_any_number_of_workers(tmp_path):
    """Many chunks (1 kB each) and several shards per split, with 1 and with 2 processes."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    metas = {}
    for workers in (1, 2):
        metas[workers] = prepare(path, tmp_path / f"w{workers}", tokenizer="gpt2",
                                 workers=workers, chunk_bytes=1000, shard_tokens=700,
                                 val_fraction=0.3, progress=False)  # fmt: skip
    assert hashes(tmp_path / "w1") == hashes(tmp_path / "w2")
    assert len(metas[1]["shards"]["train"]) >= 5 and len(metas[1]["shards"]["val"]) >= 2
    check_documents(tmp_path / "w1", make_docs(300))
    # Every shard is an llm.c shard of shard_tokens tokens, the last of each split shorter.
    for split in ("train", "val"):
        sizes = [len(read_shard(tmp_path / "w1" / s["name"])) for s in metas[1]["shards"][split]]
        assert sizes[:-1] == [700] * (len(sizes) - 1) and 0 < sizes[-1] <= 700


class Interrupt(BaseException):
    pass


def test_interrupted_prepare_resumes_from_its_last_complete_shard(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    settings = dict(tokenizer="gpt2", workers=1, chunk_bytes=1000, shard_tokens=700,
                    val_fraction=0.3, progress=False)  # fmt: skip
    prepare(path, tmp_path / "whole", **settings)
    whole = hashes(tmp_path / "whole")

    # A previous prepare in `out`, and an interruption after 12 of the ~25 chunks.
    out = tmp_path / "out"
    prepare(write_jsonl(tmp_path / "old.jsonl", make_docs(20, seed=5)), out, **settings)
    old = hashes(out)
    tokenized, interrupt_at = [], [13]
    original = sharded.tokenize_chunk

    def counting(parts, *args):
        tokenized.append(1)
        if len(tokenized) == interrupt_at[0]:
            raise Interrupt
        return original(parts, *args)

    monkeypatch.setattr(sharded, "tokenize_chunk", counting)
    with pytest.raises(Interrupt):
        prepare(path, out, **settings)
    partial = out / sharded.PARTIAL
    state = json.loads((partial / sharded.STATE).read_text())
    assert 0 < state["next_chunk"] <= 12
    # The old data is still there, untouched; the new shards wait in the hidden folder.
    assert {k: v for k, v in hashes(out).items() if k in old} == old
    assert any(p.name.endswith(".partial") for p in partial.iterdir())

    # Run again: it resumes at the checkpoint and gives exactly the uninterrupted result.
    tokenized.clear()
    interrupt_at[0] = -1
    prepare(path, out, **settings)
    assert "resuming an interrupted prepare at chunk" in capsys.readouterr().err
    n_chunks = len(list(documents.read_chunks([path], 1000, "text")))
    assert len(tokenized) == n_chunks - state["next_chunk"]
    assert hashes(out) == whole and not partial.exists()


def test_shard_completed_after_the_last_checkpoint_is_recovered(tmp_path, monkeypatch):
    """Killed between renaming a finished shard and recording it: the rerun takes it back."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    settings = dict(tokenizer="gpt2", workers=1, chunk_bytes=1000, shard_tokens=700,
                    val_fraction=0.3, progress=False)  # fmt: skip
    prepare(path, tmp_path / "whole", **settings)
    writes = []
    original = atomic.write_text

    def dies_on_third_checkpoint(target, text):
        if target.name == sharded.STATE:
            writes.append(1)
            if len(writes) == 3:
                raise Interrupt
        return original(target, text)

    monkeypatch.setattr(atomic, "write_text", dies_on_third_checkpoint)
    with pytest.raises(Interrupt):
        prepare(path, tmp_path / "out", **settings)
    finished = [p.name for p in (tmp_path / "out" / sharded.PARTIAL).glob("*.bin")]
    assert len(finished) >= 3  # the third shard is in place but not in the checkpoint
    monkeypatch.undo()
    prepare(path, tmp_path / "out", **settings)
    assert hashes(tmp_path / "out") == hashes(tmp_path / "whole")


def test_token_stream_reads_shards_as_one(tmp_path):
    parts = [np.arange(0, 5, dtype=np.uint16), np.zeros(0, np.uint16),
             np.arange(5, 12, dtype=np.uint16), np.arange(12, 13, dtype=np.uint16)]  # fmt: skip
    stream = TokenStream(parts)
    whole = np.arange(13)
    assert len(stream) == 13
    for i in range(14):
        for j in range(i, 14):
            np.testing.assert_array_equal(stream[i:j], whole[i:j])
    np.testing.assert_array_equal(np.asarray(stream), whole)
    np.testing.assert_array_equal(stream[-3:], whole[-3:])
    np.testing.assert_array_equal(
        get_batch(stream, 6, 4, seed=1, step=2), get_batch(whole.astype(np.uint16), 6, 4, 1, 2)
    )


def test_llmc_shard_directory_is_training_data(tmp_path):
    """A directory of llm.c / modded-nanogpt shards (laid out by hand, as llm.c writes them) is
    prepared data as it is: its train and val shards are streams, batches read across shards."""
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 50257, size=n) for n in (300, 50, 400)]
    val = rng.integers(0, 50257, size=200)
    d = tmp_path / "fineweb10B"
    d.mkdir()
    for i, tokens in enumerate(train):
        llmc_shard(d / f"fineweb_train_{i + 1:06d}.bin", tokens)
    llmc_shard(d / "fineweb_val_000000.bin", val)
    meta = load_meta(d)
    assert (meta["tokenizer"], meta["train_tokens"], meta["val_tokens"]) == ("gpt2", 750, 200)
    whole = np.concatenate(train)
    np.testing.assert_array_equal(np.asarray(load_tokens(d, "train")), whole)
    source = batches.make_source(d, batch_size=8, block_size=64, accum=2, seed=3)
    assert source.objective == "next_token"
    np.testing.assert_array_equal(
        source.train(5, None), get_batch(whole, 8, 64, seed=3, step=5, accum=2)
    )
    np.testing.assert_array_equal(
        source.evaluate("val", 0, None), get_batch(val, 8, 64, batches.EVAL_SEED, 0)[0]
    )
    (d / "fineweb_val_000000.bin").unlink()
    with pytest.raises(InputError, match="none for the val split"):
        load_meta(d)


def test_a_second_prepare_into_the_same_directory_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    (tmp_path / "out").mkdir()
    # Held here as another process writing there would hold it.
    with (
        sharded.exclusive(tmp_path / "out"),
        pytest.raises(InputError, match="another jaxgpt prepare is writing into"),
    ):
        prepare(path, tmp_path / "out", tokenizer="gpt2", workers=1, progress=False)
    assert not list((tmp_path / "out").iterdir())
    prepare(path, tmp_path / "out", tokenizer="gpt2", workers=1, progress=False)


def test_windows_aligned_to_document_starts(tmp_path, tiny_corpus):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(200))
    prepare(path, tmp_path / "d", tokenizer="gpt2", workers=1, shard_tokens=500, progress=False)
    stream = load_tokens(tmp_path / "d", "train")
    source = batches.text_source(tmp_path / "d", 8, 16, accum=2, seed=0, align_documents=True)
    whole = np.asarray(stream)
    eots = np.flatnonzero(whole == EOT)
    firsts = set()
    for step in range(5):
        batch = source.train(step, None)
        assert batch.shape == (2, 8, 17) and np.all(batch[..., 0] == EOT)
        for window in batch.reshape(-1, 17):  # each is the stream at one of its EOT positions
            hits = [s for s in eots if np.array_equal(whole[s : s + 17], window)]
            assert hits
            firsts.update(hits)
    assert len(firsts) > 20  # spread over many documents, not one
    np.testing.assert_array_equal(source.train(3, None), source.train(3, None))  # pure in step
    assert np.all(source.evaluate("val", 0, None)[:, 0] == EOT)
    # Character data has no document marker: a clear error.
    prepare(tiny_corpus, tmp_path / "c", split_chunk=1024, progress=False)
    with pytest.raises(ConfigError, match="align_documents needs documents"):
        batches.text_source(tmp_path / "c", 8, 16, accum=1, seed=0, align_documents=True)


def test_a_full_disk_is_one_clear_error_and_resumable(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    settings = dict(tokenizer="gpt2", workers=1, chunk_bytes=1000, shard_tokens=700,
                    progress=False)  # fmt: skip
    calls, original = [], sharded.ShardWriter.write

    def full(self, tokens):
        calls.append(1)
        if len(calls) == 30:
            raise OSError(28, "No space left on device")
        return original(self, tokens)

    monkeypatch.setattr(sharded.ShardWriter, "write", full)
    with pytest.raises(InputError, match="cannot write .* No space left on device; the complete"):
        prepare(path, tmp_path / "out", **settings)
    assert (tmp_path / "out" / sharded.PARTIAL / sharded.STATE).exists()
    monkeypatch.undo()
    prepare(path, tmp_path / "out", **settings)
    prepare(path, tmp_path / "whole", **settings)
    assert hashes(tmp_path / "out") == hashes(tmp_path / "whole")


def test_eval_scores_an_llmc_shard_directory(tmp_path, capsys):
    """`jaxgpt eval --data DIR` on llm.c shards: the val shards as one stream, scored as
    `jaxgpt.eval.perplexity` scores the concatenated tokens."""
    import jax

    from jaxgpt.cli import main
    from jaxgpt.config import GPTConfig
    from jaxgpt.eval import perplexity
    from jaxgpt.params import init_params
    from jaxgpt.pretrained import load_hf, save_hf

    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "model")
    rng = np.random.default_rng(1)
    val = [rng.integers(0, 50257, size=n) for n in (30, 25)]
    d = tmp_path / "shards"
    d.mkdir()
    llmc_shard(d / "fineweb_train_000000.bin", rng.integers(0, 50257, size=100))
    for i, tokens in enumerate(val):
        llmc_shard(d / f"fineweb_val_{i:06d}.bin", tokens)
    out = tmp_path / "ppl.json"
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(d), "--stride", "8",
            "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(out.read_text())
    config, params = load_hf(tmp_path / "model")
    expected = perplexity(params, config, np.concatenate(val), get_tokenizer(), stride=8)
    assert record["tokens"] == 54 and record["split"] == "val"
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)
