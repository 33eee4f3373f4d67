"""Preference data: reading pairs, preparing them (split by prompt, mask on the final answer),
and drawing batches as a pure function of (seed, step)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import batches, chat
from jaxgpt.cli import main
from jaxgpt.errors import ChatFormatError, InputError
from jaxgpt.preferences import (
    get_pair_batch,
    load_pairs,
    pair_indices,
    prepare_preferences,
    read_preferences,
    tokenizer_from_meta,
)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _pairs_file(tmp_path: Path, n_prompts: int = 12, per_prompt: int = 3) -> Path:
    """`per_prompt` pairs for each of `n_prompts` prompts (some as a conversation)."""
    records = []
    for p in range(n_prompts):
        prompt = f"What is {p} + 1?"
        if p % 3 == 0:  # a multi-turn prompt: its earlier assistant turn is not trained
            prompt = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": prompt},
            ]
        for k in range(per_prompt):
            rejected = f"so {p + k + 2}"
            records.append({"prompt": prompt, "chosen": f"so {p + 1}", "rejected": rejected})
    return _write(tmp_path / "pairs.jsonl", records)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- reading


def test_read_preferences_both_prompt_forms(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            "",
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": ""},
        ],
    )
    first, second = read_preferences(path)
    assert first.prompt == ({"role": "user", "content": "2+2?"},)
    assert first.conversation("rejected")[-1] == {"role": "assistant", "content": "5"}
    assert (second.chosen, second.rejected, second.where) == ("Hello", "", f"{path}:3")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "rejected": "b"}', 'missing "chosen"'),
        ('{"prompt": "a", "chosen": "b"}', 'missing "rejected"'),
        ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "identical"),
        ('{"prompt": "a", "chosen": 3, "rejected": "b"}', '"chosen" must be a string'),
        ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            '{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],'
            ' "chosen": "c", "rejected": "d"}',
            "must end with a user turn",
        ),
        ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}', "role"),
        (
            '{"prompt": "What is 14 + 7?", "chosen": "21", "rejected": "2", "task": "arithmetic"}',
            "held-out problem 14 + 7",
        ),
        ('{"prompt": "a", "chosen": "b", "rejected": "c", "task": "chess"}', '"task"'),
    ],
)
def test_read_preferences_errors_name_file_and_line(tmp_path, line, message):
    good = '{"prompt": "x", "chosen": "y", "rejected": "z"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ChatFormatError) as err:
        read_preferences(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_read_preferences_not_utf8_and_missing(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(ChatFormatError, match=r"latin1.jsonl:1: not UTF-8 text"):
        read_preferences(path)
    with pytest.raises(ChatFormatError, match="cannot read preference data"):
        read_preferences(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- prepare


def test_prepare_splits_by_prompt_and_masks_the_final_answer(tmp_path):
    source = _pairs_file(tmp_path)
    meta = prepare_preferences(source, tmp_path / "data", val_fraction=0.3, progress=False)
    assert meta["format"] == "preference" and meta["tokenizer"] == "char"
    assert meta["train_pairs"] + meta["val_pairs"] == 36
    assert meta["train_prompts"] + meta["val_prompts"] == 12
    assert meta["train_pairs"] == 3 * meta["train_prompts"]  # a prompt's pairs stay together
    tok = tokenizer_from_meta(meta)
    end = chat.chat_tokens(tok).end
    prompts = {}
    for split in ("train", "val"):
        pairs = load_pairs(tmp_path / "data", split)
        assert pairs.count == meta[f"{split}_pairs"]
        for i in range(pairs.count):
            for side in ("chosen", "rejected"):
                ids, mask = pairs.side(side).doc(i)
                answer_start = int(np.flatnonzero(mask)[0])
                prompt = tok.decode(ids[:answer_start].tolist())
                prompts.setdefault(prompt, set()).add(split)
                # The mask is exactly the final answer and its <|end|>, nothing of the prompt
                # (not the earlier "Hello" assistant turn either).
                assert mask[answer_start:].all() and not mask[:answer_start].any()
                assert ids[-1] == end and tok.decode(ids[answer_start:-1].tolist()).startswith("so")
    assert len(prompts) == 12 and all(len(s) == 1 for s in prompts.values())
    assert {s for v in prompts.values() for s in v} == {"train", "val"}


def test_prepare_is_deterministic_and_atomic(tmp_path):
    source = _pairs_file(tmp_path)
    prepare_preferences(source, tmp_path / "a", split_seed=3, progress=False)
    prepare_preferences(source, tmp_path / "b", split_seed=3, progress=False)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    before = _hashes(tmp_path / "a")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{"])
    with pytest.raises(ChatFormatError, match="bad.jsonl:2"):
        prepare_preferences(bad, tmp_path / "a", progress=False)
    assert _hashes(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_needs_two_prompts_and_the_tokenizer_characters(tmp_path):
    one = _write(tmp_path / "one.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    with pytest.raises(InputError, match="at least 2 are needed"):
        prepare_preferences(one, tmp_path / "d1", progress=False)
    from jaxgpt.tokenizer import CharTokenizer

    with pytest.raises(InputError, match=r"pairs.jsonl:1: .*not in this"):
        prepare_preferences(
            _pairs_file(tmp_path), tmp_path / "d2", tokenizer=CharTokenizer("abc"), progress=False
        )


# --------------------------------------------------------------------------- batches


@pytest.fixture
def prepared(tmp_path):
    prepare_preferences(_pairs_file(tmp_path), tmp_path / "data", progress=False)
    return tmp_path / "data"


def test_get_pair_batch_is_a_pure_function_of_seed_and_step(prepared):
    pairs = load_pairs(prepared, "train")
    batch = get_pair_batch(pairs, 4, 60, seed=1, step=7, accum=2)
    assert sorted(batch) == ["chosen", "chosen_mask", "rejected", "rejected_mask"]
    for v in batch.values():
        assert v.shape == (2, 4, 61) and v.dtype == np.int32
    again = get_pair_batch(pairs, 4, 60, seed=1, step=7, accum=2)
    other = get_pair_batch(pairs, 4, 60, seed=1, step=8, accum=2)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["chosen"], other["chosen"])
    share = get_pair_batch(pairs, 4, 60, seed=1, step=7, accum=2, rows=(2, 4))
    assert all(np.array_equal(share[k], batch[k][:, 2:4]) for k in batch)
    # Row (a, b) is pair index[a, b], right-padded with zeros.
    index = pair_indices(pairs.count, 4, 1, 7, accum=2)
    ids, mask = pairs.chosen.doc(int(index[1, 3]))
    assert np.array_equal(batch["chosen"][1, 3, : len(ids)], ids)
    assert np.array_equal(batch["chosen_mask"][1, 3, : len(ids)], mask)
    assert not batch["chosen"][1, 3, len(ids) :].any()
    assert not batch["chosen_mask"][1, 3, len(ids) :].any()


def test_trained_targets_are_the_answers(prepared):
    """`tokens[1:]` where `mask[1:]` is 1 — the chat data's alignment — gives each answer."""
    tok = tokenizer_from_meta(json.loads((prepared / "meta.json").read_text()))
    batch = get_pair_batch(load_pairs(prepared, "train"), 6, 60, seed=0, step=0)
    for side in ("chosen", "rejected"):
        for row, mask in zip(batch[side][0], batch[f"{side}_mask"][0]):
            text = tok.decode(row[1:][mask[1:] > 0].tolist())
            assert text.startswith("so ") and text.endswith(chat.END)


def test_too_long_pairs_are_refused(prepared):
    with pytest.raises(InputError, match=r"longer than block_size \+ 1 = 9 tokens"):
        batches.make_source(prepared, 2, 8, 1, 0, progress=False)


def test_preference_source_with_reference(prepared):
    """The reference log-probs travel with the batch; precomputed equals on the fly."""

    def reference(rows_NT1):  # any deterministic function of a row stands in for a model
        return np.cumsum(rows_NT1, axis=1).astype(np.float32) / 100

    plain = batches.make_source(prepared, 3, 60, 2, 5, progress=False)
    assert plain.objective == "dpo" and "chosen_reference" not in plain.train(0, None)
    pre = batches.make_source(prepared, 3, 60, 2, 5, reference=reference, progress=False)
    fly = batches.make_source(prepared, 3, 60, 2, 5, reference=reference, precompute=False,
                              progress=False)  # fmt: skip
    for step in (0, 4):
        a, b = pre.train(step, None), fly.train(step, None)
        assert sorted(a) == sorted(b) and a["rejected_reference"].shape == (2, 3, 61)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert np.array_equal(a["chosen_reference"], reference(a["chosen"].reshape(6, 61))
                              .reshape(2, 3, 61))  # fmt: skip
    e = pre.evaluate("val", 0, None)
    assert e["chosen"].shape == (3, 61) and e["chosen_reference"].shape == (3, 61)


def test_prepare_cli(tmp_path, capsys):
    source = _pairs_file(tmp_path)
    assert main(["prepare", str(source), str(tmp_path / "d"), "--format", "preference",
                 "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "train pairs" in out and "val pairs" in out
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["format"] == "preference"
