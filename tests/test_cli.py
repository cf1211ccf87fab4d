"""The `kd` command as a user runs it: a real distillation on the tiny world, and bad input."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factories import make_model, make_tokenizer, save_pretrained_pair


def kd(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=900)


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
        (["loss.temperature=inf"], "loss.temperature='inf' is not allowed: expected a finite number"),
        (["--config", "bad.yaml"], "config='bad.yaml' is not allowed: YAML syntax error at bad.yaml:3:13: mapping values"),
        (["--bogus"], "error: unrecognized arguments: --bogus (see kd --help)"),
        # CUDA hidden, so that the check holds on a machine with a GPU too.
        (["train.device=cuda"], "train.device='cuda' is not allowed here: "),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text("loss:\n  temperature: 2\n   kd_weight: 0.5\n")
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = kd("distill", *args, f"output_dir={out}", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert time.monotonic() - t0 < 15
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


def test_overrides_after_an_option_are_overrides(tmp_path, capsys):
    """``kd distill a=1 --no-eval b=2``: argparse alone would call b=2 unrecognized."""
    line = _refused(capsys, "distill", "loss.temperature=3", "--no-eval", "loss.kd_weight=7",
                    f"output_dir={tmp_path / 'out'}")
    assert "loss.kd_weight=7.0 is not allowed: must be in [0, 1]" in line
    from kd.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's own exit, with kd's one line
        main(["distill", "loss.temperature=3", "--no-eval", "--bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "kd: error: unrecognized arguments: --bogus (see kd --help)\n"


def test_help_explains_options():
    r = kd("distill", "--help")
    assert r.returncode == 0 and "loss.temperature" in r.stdout and "--config" in r.stdout


# ------------------------------------------------------------ preflight: before any work


@pytest.fixture(scope="module")
def warm_tiny_world(tiny_overrides):
    """The tiny world and its packed blocks in the cache, so that only kd's own line is on stderr."""
    from kd.config import load_config
    from kd.preflight import check_training

    check_training(load_config(overrides=_overrides(tiny_overrides)))


def _refused(capsys, *argv: str) -> str:
    from kd.cli import main

    t0 = time.monotonic()
    code = main(list(argv))
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot write: permission bits, or (as root, who ignores them) /proc."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d / "out" if not os.access(d, os.W_OK) else Path("/proc/kd-test-out")


@pytest.mark.parametrize("case", ["file", "under_a_file", "unwritable"])
def test_output_dir_that_cannot_be_written_is_refused_first(tmp_path, capsys, warm_tiny_world, tiny_overrides, case):
    f = tmp_path / "taken"
    f.write_text("a file")
    out = f if case == "file" else f / "out" if case == "under_a_file" else _unwritable(tmp_path)
    # A teacher of 5000 steps is not in the cache: had it started training, the 15 s would be gone.
    line = _refused(capsys, "distill", *_overrides(tiny_overrides), "teacher.steps=5000", f"output_dir={out}")
    assert line.startswith(f"kd: error: output_dir={str(out)!r} is not allowed: "), line
    assert ("is a file" in line) if case != "unwritable" else ("cannot be written" in line)
    assert f.read_text() == "a file"  # nothing written, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == (["readonly", "taken"] if case == "unwritable" else ["taken"])
    if case == "unwritable":
        assert list((tmp_path / "readonly").iterdir()) == [] and not out.exists()


@pytest.mark.parametrize("command, key", [("distill", "train.batch_size"), ("distill", "teacher.batch_size"),
                                          ("teacher", "teacher.batch_size")])
def test_batch_larger_than_the_data_is_refused_before_training(tmp_path, capsys, warm_tiny_world, tiny_overrides,
                                                              command, key):
    out = tmp_path / "out"
    line = _refused(capsys, command, *_overrides(tiny_overrides), "teacher.steps=5000", f"{key}=100000",
                    f"output_dir={out}")
    assert re.fullmatch(rf"kd: error: {re.escape(key)}=100000 is not allowed: the data has only \d+ training "
                        r"blocks; use at most \d+ or add data", line), line
    assert not out.exists()


def test_hub_ids_that_cannot_be_reached_are_one_line(tmp_path, capsys, warm_tiny_world, tiny_overrides):
    out = tmp_path / "out"
    line = _refused(capsys, "distill", *_overrides(tiny_overrides), "teacher.source=no-such-org/no-such-model",
                    "student.n_head=1", f"output_dir={out}")
    assert "teacher.source='no-such-org/no-such-model' is not allowed: it is not an existing local directory" in line
    line = _refused(capsys, "distill", *_overrides(tiny_overrides), "data.source=no_such_dataset",
                    f"output_dir={out}")
    assert "data.source='no_such_dataset' is not allowed: it is not an existing local path" in line
    assert not out.exists()


def test_relative_folder_without_dot_slash_is_used_as_a_path(tmp_path, capsys, mismatched_pair, monkeypatch):
    """``teacher.source=my_teacher``, ``data.source=mydata``: folders in the working directory."""
    import shutil

    teacher, _, data = mismatched_pair
    shutil.copytree(teacher, tmp_path / "my_teacher")
    (tmp_path / "mydata").mkdir()
    shutil.copy(data, tmp_path / "mydata" / "train.txt")
    monkeypatch.chdir(tmp_path)
    from kd.config import load_config
    from kd.preflight import check_training

    cfg = load_config(overrides=["teacher.source=my_teacher", "data.source=mydata", "train.batch_size=2",
                                 "student.n_embd=32", "output_dir=out"])
    tok = check_training(cfg)  # loads the teacher's tokenizer and packs the folder's text
    assert len(tok) == len(make_tokenizer())
    assert cfg.teacher.source == str(tmp_path / "my_teacher")


# ----------------------------------------------------------------- resume and Ctrl-C


def _student_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "student" / "model.safetensors"))


def _resume_args(tiny_overrides) -> list[str]:
    # fp32 and no compile: the auto choices probe the machine, and both runs must choose alike.
    return [*_overrides(tiny_overrides), "train.steps=30", "train.eval_every=10", "train.precision=fp32",
            "train.compile=false"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_overrides) -> Path:
    """One run never interrupted, which every interrupted-and-resumed run must equal."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    done = kd("distill", "--no-eval", *_resume_args(tiny_overrides), f"output_dir={ref}")
    assert done.returncode == 0, done.stderr[-3000:]
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_then_rerun_continues_exactly(tmp_path, tiny_overrides, uninterrupted_run, sig):
    """SIGINT (Ctrl-C) or SIGTERM (kill, a scheduler) mid-run: one line, exit 130, a
    checkpoint; the same command again finishes the run from it, to the same weights as a
    run that was never interrupted."""
    args = _resume_args(tiny_overrides)

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kd.cli", "distill", "--no-eval", *args, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoints" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]  # the progress bar ended, then kd's one line
    assert re.fullmatch(r"kd: interrupted: checkpoint at step \d+ in .*; rerun the same command to resume", last), \
        err[-3000:]
    assert err.count("kd:") == 1
    assert "Traceback" not in err
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 30 and not (out / "metrics.json").exists()

    again = kd("distill", "--no-eval", *args, f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {step}:" in again.stdout
    a, b = _student_weights(uninterrupted_run), _student_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_ref, m_run = (json.loads((p / "metrics.json").read_text()) for p in (uninterrupted_run, out))
    assert m_ref["val_loss"] == m_run["val_loss"] and m_run["step"] == 30

    if sig != signal.SIGINT:
        return  # what follows is about the checkpoint, not the signal that made it
    # Other settings in the same output_dir: refused in one line naming what differs.
    from kd import resume
    from kd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"holds a checkpoint of other settings \(loss.temperature: 2.0 -> 4.0\)"):
        resume.plan(load_config(overrides=[*args, "loss.temperature=4", f"output_dir={out}"]))
    assert resume.plan(load_config(overrides=[*args, "train.threads=1", f"output_dir={out}"])) is not None
    assert resume.plan(load_config(overrides=[*args, f"output_dir={out}"]), fresh=True) is None
    assert not (out / "checkpoints").exists()
    with pytest.raises(ConfigError, match="--resume is not allowed: .* holds no checkpoint"):
        resume.plan(load_config(overrides=[*args, f"output_dir={out}"]), resume=True)


# ---------------------------------------------------------------------------- help


def _help(capsys, *argv: str) -> str:
    from kd.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_help_lists_every_key_with_default_and_allowed_values(capsys, command):
    from kd.config import describe_keys

    text = _help(capsys, command)
    for key, default, allowed, doc in describe_keys():
        assert f"  {key}={default}  [{allowed}]" in text, key
    assert "  loss.temperature=2.0  [number > 0]" in text and "train.device=auto  [auto | cpu | cuda" in text


def test_every_subcommand_help_shows_defaults_and_choices(capsys):
    from kd.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"world", "teacher", "distill", "eval", "report", "ui"} <= set(sub.choices)
    for name, parser in sub.choices.items():
        text = " ".join(_help(capsys, name).split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (name, action.dest)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.dest)
    assert "(default: 5000)" in " ".join(_help(capsys, "ui").split())


def test_a_folder_that_is_no_model_is_one_line(tmp_path, capsys, warm_tiny_world, tiny_overrides):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for key in ("teacher.source", "student.source"):
        line = _refused(capsys, "distill", *_overrides(tiny_overrides), f"{key}={empty}", "student.n_head=1",
                        f"output_dir={out}")
        assert f"{key}={str(empty)!r} is not allowed: that path holds no loadable tokenizer" in line, line
    assert not out.exists()
