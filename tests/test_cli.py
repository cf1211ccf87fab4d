"""The `kd` command as a user runs it: a real distillation on the tiny world, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import make_model, make_tokenizer, save_pretrained_pair


def kd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=os.environ.copy(), timeout=900)


def _overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def test_distill_tiny_world_saves_a_loadable_student(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    r = kd("distill", *_overrides(tiny_overrides), f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"student: {out}/student" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "teacher_val_loss", "acc_mean", "teacher_acc_mean", "em_qa", "params",
                "latency_ms_per_token", "retention"):
        assert key in metrics, key
    # The trained teacher knows the world better than a 20-step student does.
    assert metrics["teacher_val_loss"] < metrics["val_loss"]
    assert metrics["params"] < 200_000

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert (out / "student" / "model.safetensors").exists()
    ids = tok("Question: Where was", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    assert isinstance(tok.decode(gen[0]), str)


def test_world_command_prints_its_directory():
    r = kd("world", "--size", "tiny")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.splitlines()[0])
    assert (path / "qa.jsonl").exists() and (path / "tokenizer").is_dir()


@pytest.fixture(scope="module")
def mismatched_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok_a = make_tokenizer()
    tok_b = make_tokenizer(["completely different words here " * 3, "other text entirely"] * 10, vocab_size=280)
    a = save_pretrained_pair(root / "teacher", tok_a, make_model(tok_a))
    b = save_pretrained_pair(root / "student", tok_b, make_model(tok_b))
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return a, b, data


@pytest.mark.parametrize(
    "args, needle",
    [
        (["loss.temperature=0"], "loss.temperature=0.0 is not allowed: must be > 0"),
        (["loss.kd_weight=2"], "loss.kd_weight=2.0 is not allowed: must be in [0, 1]"),
        (["student.n_embd=96", "student.n_head=5"], "student.n_embd=96 is not allowed: must be divisible by student.n_head=5"),
        (["data.source=./no/such/data.txt"], "data.source='./no/such/data.txt' is not allowed: a local path must exist"),
        (["loss.temprature=2"], "unknown config key 'loss.temprature'; did you mean 'loss.temperature'?"),
        (["--config", "missing.yaml"], "config='missing.yaml' is not allowed: the file does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    r = kd("distill", *args, f"output_dir={out}", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()


def test_tokenizer_mismatch_is_refused_before_writing(tmp_path, mismatched_pair):
    teacher, student, data = mismatched_pair
    out = tmp_path / "out"
    r = kd("distill", f"teacher.source={teacher}", f"student.source={student}", f"data.source={data}",
           f"output_dir={out}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "student.source is not allowed: its tokenizer differs from the teacher's" in lines[0]
    assert not out.exists()


def test_help_explains_options():
    r = kd("distill", "--help")
    assert r.returncode == 0 and "loss.temperature" in r.stdout and "--config" in r.stdout
