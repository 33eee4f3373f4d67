"""The arithmetic demo's problems, held-out rule and verifier."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxgpt import arithmetic as ar
from jaxgpt.errors import InputError


def test_held_out_rule_counts_the_pairs_by_hand():
    held = [(a, b) for a in range(100) for b in range(100) if ar.is_held_out(a, b)]
    # For each a, the b in [0, 99] with b ≡ a (mod 7): 15 when a mod 7 ≤ 1 (0..98 has 15 of
    # residues 0 and 1), else 14. 30 values of a have residue 0 or 1.
    assert len(held) == 30 * 15 + 70 * 14 == 1430
    assert ar.is_held_out(10, 3) and ar.is_held_out(3, 10) and not ar.is_held_out(10, 4)


def test_training_conversations_never_hold_a_held_out_pair():
    seen = 0
    for messages in ar.training_conversations(2000, seed=0):
        ar.check_training_messages(messages)  # raises on a held-out pair
        for m in messages:
            if m["role"] == "user":
                a, b = (int(x) for x in ar._LAST_INTEGER.findall(m["content"]))
                assert not ar.is_held_out(a, b)
                seen += 1
    assert seen > 2000  # some conversations have several turns


def test_conversations_alternate_and_answers_verify():
    rng = np.random.default_rng(3)
    for _ in range(200):
        messages = ar.conversation(rng)
        roles = [m["role"] for m in messages if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        for q, a in zip(messages[-len(roles) :: 2], messages[-len(roles) + 1 :: 2]):
            x, y = (int(v) for v in ar._LAST_INTEGER.findall(q["content"]))
            assert ar.verify(a["content"], x, y)


def test_verify_reads_the_last_integer():
    assert ar.verify("45 + 38 = 83", 45, 38)
    assert not ar.verify("45 + 38 = 84", 45, 38)
    assert not ar.verify("no number", 45, 38)
    assert ar.verify("so the sum is 83", 45, 38)


def test_held_out_problems_are_held_out_and_deterministic():
    problems = ar.held_out_problems(500, seed=7)
    assert problems == ar.held_out_problems(500, seed=7)
    assert all(ar.is_held_out(a, b) for a, b, _ in problems)
    acc, se = ar.accuracy([ar.answer(a, b) for a, b, _ in problems], problems)
    assert acc == 1.0 and se == 0.0
    acc, se = ar.accuracy(["0"] * 500, problems)
    assert acc < 0.01


def test_write_jsonl_refuses_held_out_training_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    assert ar.write_jsonl(path, ar.training_conversations(50, seed=1)) == 50
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and "messages" in json.loads(lines[0])
    bad = [[{"role": "user", "content": "What is 10 + 3?"}, {"role": "assistant", "content": "13"}]]
    with pytest.raises(InputError, match="held-out problem 10 \\+ 3"):
        ar.write_jsonl(tmp_path / "bad.jsonl", iter(bad))
    assert not (tmp_path / "bad.jsonl").exists()


def test_answer_is_column_addition_worked_by_hand():
    assert ar.answer(45, 38) == "45+38: 5+8=13 4+3+1=8 so 83"
    assert ar.answer(12, 34) == "12+34: 2+4=6 1+3+0=4 so 46"
    assert ar.answer(99, 99) == "99+99: 9+9=18 9+9+1=19 so 198"
    assert all(ar.verify(ar.answer(a, b), a, b) for a in range(100) for b in range(0, 100, 7))
