"""The embedded world: determinism, file schemas, held-out splits, tokenizer, cache."""

from __future__ import annotations

import json
import sys

import pytest

from kd.config import ConfigError
from kd.world import QA_TEMPLATE, ensure_world, generate_world
from kd.world_render import ATTRIBUTES

FILES = ("train.jsonl", "val.jsonl", "completion.jsonl", "choice.jsonl", "qa.jsonl", "qa_fewshot.jsonl")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield ensure_world("tiny", 0)
    mp.undo()


@pytest.fixture(scope="module")
def world():
    return generate_world("tiny", 0)


def test_no_torch_at_import():
    code = "import sys, kd.world; assert 'torch' not in sys.modules, 'kd.world imported torch'"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_seed_same_bytes_and_other_seed_differs(world_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    again = ensure_world("tiny", 0)
    assert again != world_dir  # a fresh build in another cache, not a hit
    for name in FILES + ("world.json", "tokenizer/tokenizer.json"):
        assert (again / name).read_bytes() == (world_dir / name).read_bytes(), name
    other = generate_world("tiny", 1)
    assert other.train != generate_world("tiny", 0).train
    assert [p.name for p in other.people] != [p.name for p in generate_world("tiny", 0).people]


def test_file_schemas(world_dir):
    for name in ("train.jsonl", "val.jsonl", "completion.jsonl"):
        rows = _jsonl(world_dir / name)
        assert rows and all(set(r) == {"text"} and r["text"].strip() for r in rows), name
    for name in ("qa.jsonl", "qa_fewshot.jsonl"):
        rows = _jsonl(world_dir / name)
        assert rows and all(set(r) == {"question", "answer"} for r in rows), name
        assert all(isinstance(r["question"], str) and r["question"].endswith("?") for r in rows)
        assert all(isinstance(r["answer"], list) and r["answer"] and
                   all(isinstance(a, str) and a for a in r["answer"]) for r in rows)
    assert 3 <= len(_jsonl(world_dir / "qa_fewshot.jsonl")) <= 8
    for r in _jsonl(world_dir / "choice.jsonl"):
        assert set(r) == {"ctx", "endings", "label"}
        assert len(r["endings"]) == 4 and len(set(r["endings"])) == 4
        assert isinstance(r["label"], int) and 0 <= r["label"] < 4
    info = json.loads((world_dir / "world.json").read_text())
    assert info["size"] == "tiny" and info["seed"] == 0 and info["fingerprint"] == world_dir.name
    assert info["counts"]["train_docs"] == len(_jsonl(world_dir / "train.jsonl"))
    assert info["counts"]["qa"] == len(_jsonl(world_dir / "qa.jsonl"))
    assert 0 < info["tokens"]["train_bio"] < info["tokens"]["train"]


def test_people_are_unique_and_choices_vary(world):
    names = [p.name for p in world.people]
    assert len(names) == len(set(names)) == 40
    labels = [r["label"] for r in world.choice]
    assert set(labels) == {0, 1, 2, 3}  # the true ending is not always in one place
    by_name = {p.name: p for p in world.people}
    for r in world.choice:  # the labelled ending is the person's true fact
        name = next(n for n in names if r["ctx"].startswith(n + " "))
        assert r["endings"][r["label"]] in [by_name[name].fact(a) for a in ATTRIBUTES]


def test_heldout_people_have_bios_but_no_training_qa(world):
    qa_docs = [t for t in world.train if t.startswith("Question:")]
    heldout = {p.name for p in world.qa_heldout}
    assert heldout and not heldout & {p.name for p in world.qa_trained}
    for p in world.qa_heldout:
        assert not any(p.name in d for d in qa_docs), p.name
        bios = [t for t, k in zip(world.train, world.train_kinds) if k == "bio" and p.name in t]
        assert len(bios) >= 2
        assert all(p.fact(a) in b for b in bios for a in ATTRIBUTES)
    for p in world.qa_trained:
        assert any(p.name in d for d in qa_docs), p.name
    asked = {n for r in world.qa for n in heldout if n in r["question"]}
    assert asked == heldout
    for r in world.qa:  # every accepted answer is in that person's biographies
        p = next(p for p in world.qa_heldout if p.name in r["question"])
        assert any(r["answer"][0] == p.fact(a) for a in ATTRIBUTES)
    for r in world.qa_fewshot:  # few-shot pairs come from training QA
        assert any(r["question"] in d and f"Answer: {r['answer'][0]}" in d for d in qa_docs)


def test_qa_documents_use_the_template(world):
    doc = next(t for t in world.train if t.startswith("Question:"))
    pairs = doc.split("\n\n")
    assert len(pairs) >= 3
    prefix, _ = QA_TEMPLATE.split("{question}")
    for pair in pairs:
        q, a = pair.split("\nAnswer: ")
        assert QA_TEMPLATE.format(question=q[len(prefix):], answer=a) == pair


def test_completion_targets_are_fixed_by_context(world):
    train_text = set(world.train)
    for r in world.completion:
        context, target = r["text"].rsplit(" ", 1)
        assert target.isalpha(), target  # no punctuation attached to the last word
        assert target in context.split(" ") or target + "." in context or target + "," in context
        assert r["text"] + "." not in train_text  # held out from training stories
    assert len({r["text"] for r in world.completion}) == len(world.completion)


def test_val_is_fresh(world):
    assert not set(world.val) & set(world.train)
    assert sum(1 for t in world.val if any(p.name in t for p in world.people)) >= len(world.people)


def test_tokenizer_round_trip(world_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world_dir / "tokenizer"))
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert 512 < len(tok) <= 4096
    for r in _jsonl(world_dir / "qa.jsonl")[:5] + _jsonl(world_dir / "val.jsonl")[:5]:
        text = r.get("text") or QA_TEMPLATE.format(question=r["question"], answer=r["answer"][0])
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode()) / 2  # BPE actually merged something
    assert tok.decode(tok("ünïcode ✓ 2026")["input_ids"]) == "ünïcode ✓ 2026"  # byte-level


def test_cache_hit(world_dir, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(world_dir.parent.parent))
    stamp = (world_dir / "train.jsonl").stat().st_mtime_ns
    assert ensure_world("tiny", 0) == world_dir
    assert (world_dir / "train.jsonl").stat().st_mtime_ns == stamp
    assert not [p for p in world_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_bad_size(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    msg = "data.world_size='huge' is not allowed: choose one of tiny, small, default"
    with pytest.raises(ConfigError) as e:
        ensure_world("huge")
    assert str(e.value) == msg
    with pytest.raises(ConfigError, match="data.world_size='huge'"):
        generate_world("huge")
    assert not (tmp_path / "worlds").exists()  # nothing written
