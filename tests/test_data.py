"""Text -> packed blocks from local files and the world; caching and splits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from factories import make_tokenizer
from kd.config import ConfigError, DataConfig
from kd.data import load_blocks, load_texts

_rng = random.Random(0)
_WORDS = "fox dog jumps over lazy quick brown teacher student token model learns".split()
# Random word orders make every 32-token block unique, so split disjointness is testable.
DOCS = [f"document {i}: " + " ".join(_rng.choice(_WORDS) for _ in range(12)) + "." for i in range(300)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _expected_tokens(tok, docs):
    return sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_pack_into_blocks(tmp_path, tok, kind):
    d = tmp_path / kind
    d.mkdir()
    train, valid = DOCS[:250], DOCS[250:]
    if kind == "txt":
        (d / "train.txt").write_text("\n".join(train))
        (d / "valid.txt").write_text("\n".join(valid))
    elif kind == "jsonl":
        (d / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in train))
        (d / "valid.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in valid))
    else:
        import pandas as pd

        pd.DataFrame({"text": train}).to_parquet(d / "train.parquet")
        pd.DataFrame({"text": valid}).to_parquet(d / "valid.parquet")
    cfg = DataConfig(source=str(d), block_size=32)
    blocks = load_blocks(cfg, tok)
    assert blocks.train.dtype == torch.int64 and blocks.train.shape[1] == 32
    assert blocks.train.shape[0] == _expected_tokens(tok, train) // 32
    assert blocks.val.shape[0] == _expected_tokens(tok, valid) // 32
    # documents are separated by eos
    assert (blocks.train == tok.eos_token_id).sum() >= len(train) - 32
    again = load_blocks(cfg, tok)  # cache hit returns the same tensors
    assert torch.equal(again.train, blocks.train)


def test_single_file_gets_a_seeded_validation_split(tmp_path, tok):
    f = tmp_path / "all.txt"
    f.write_text("\n".join(DOCS))
    cfg = DataConfig(source=str(f), block_size=32, val_fraction=0.1)
    b = load_blocks(cfg, tok)
    total = _expected_tokens(tok, DOCS) // 32
    assert b.val.shape[0] == int(total * 0.1) and b.train.shape[0] + b.val.shape[0] == total
    train_rows = {tuple(r.tolist()) for r in b.train}
    assert not any(tuple(r.tolist()) in train_rows for r in b.val)


def test_world_source_has_train_and_validation():
    texts = load_texts(DataConfig(source="world", world_size="tiny"))
    assert texts["train"] and texts["validation"]


def test_bad_sources_are_one_line_errors(tmp_path, tok):
    with pytest.raises(ConfigError, match="data.source='/nope' is not allowed: the path does not exist"):
        load_blocks(DataConfig(source="/nope"), tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no .txt, .jsonl, .json, .parquet files found"):
        load_blocks(DataConfig(source=str(empty)), tok)
    j = tmp_path / "j"
    j.mkdir()
    (j / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="data.text_column='text' is not allowed"):
        load_blocks(DataConfig(source=str(j)), tok)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="too little text"):
        load_blocks(DataConfig(source=str(short), block_size=64), tok)
