"""The benchmark scripts run end to end (``--quick``) and print the tables they promise.

Each runs in a subprocess with the session's temporary ``KD_CACHE_DIR`` (tests/conftest.py),
so the tiny world and teacher are shared with the other tests and nothing reads
``../shared``: the WikiText-2 script gets a small made-up corpus in the same file layout.
Only the shape of the output is checked; timings belong to the benchmarks themselves.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each one trains a teacher and students: 20-60 s here


def _run(script: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table(out: str, first_columns: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header starts with ``first_columns``: (header, rows)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_columns} |"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def _positive(cell: str) -> float:
    value = float(cell.rstrip("x%").removesuffix("M"))
    assert value > 0, cell
    return value


def test_train_throughput_quick(tmp_path):
    out = _run("train_throughput.py", "--quick", "--json", str(tmp_path / "out.json"))
    header, rows = _table(out, "loop")
    assert header[:7] == ["loop", "tokens/s (median)", "runs", "vs reference", "GFLOP/s", "MFU (fp32 peak)",
                          "compile_s (first)"]
    assert [r[0] for r in rows] == ["kd.train (cache)", "kd.train (online)", "reference loop",
                                    "kd.train (teacher shape, CE)"]
    for r in rows:
        for cell in (r[1], r[3], r[4], r[5]):
            _positive(cell)
        assert len(r[2].split(",")) == 3  # one figure per repeat
    assert rows[2][3] == "1.00x"
    assert "fp32 matmul peak" in out
    import json

    data = json.loads((tmp_path / "out.json").read_text())
    assert {"kd_tokens_per_s", "reference_tokens_per_s", "ratio", "mfu", "peak_gflops"} <= set(data)
    assert data["ratio"] == pytest.approx(data["kd_tokens_per_s"] / data["reference_tokens_per_s"])
    assert 0 < data["mfu"] < 1 and 0 < data["online"]["mfu"] < 1 and 0 < data["teacher_shape"]["mfu"] < 1
    assert float(rows[0][1]) == pytest.approx(data["kd_tokens_per_s"], abs=1)


def test_sweep_overhead_quick(tmp_path):
    # Two of the three ways: one-at-a-time is the same Tune path as the default with other
    # numbers (a third Ray start would add ~25 s to the suite for no new code).
    out = _run("sweep_overhead.py", "--quick", "--modes", "tune-in-trial,plain-loop", "--output-dir", str(tmp_path))
    header, rows = _table(out, "way")
    assert header[:7] == ["way", "most trials at once", "sweep wall s", "trials' span s",
                          "training tokens / s of the span", "sum train_time_s", "wall / sum train"]
    assert [r[0] for r in rows] == ["tune-in-trial", "plain-loop"]
    # The default runs trials of a share of the cores side by side (2 cores: two of 1 thread).
    assert [r[1] for r in rows] == [str(min(2, os.cpu_count() or 1)), "1"]
    for r in rows:
        for cell in r[2:10]:
            _positive(cell.replace(",", ""))
    _, trials = _table(out, "way | T")  # the per-trial table
    assert len(trials) == 4  # 2 trials x 2 ways
    assert all(_positive(t[5]) for t in trials)  # train_time_s


def _fake_wikitext(root: Path) -> Path:
    """Three splits of made-up text in WikiText-2's layout (one paragraph or heading per line)."""
    rng = random.Random(0)
    words = ("the river city was built in the early century by a group of settlers who came from "
             "the north and traded grain wool and timber along the coast").split()
    root.mkdir()
    for name, n in (("train.txt", 500), ("valid.txt", 80), ("test.txt", 80)):
        lines = []
        for i in range(n):
            lines.append(" = Heading = " if i % 20 == 0 else " ".join(rng.choice(words) for _ in range(40)) + " .")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_wikitext2_quick(tmp_path):
    data = _fake_wikitext(tmp_path / "wikitext")
    out = _run("wikitext2.py", "--quick", "--seeds", "2", "--data", str(data), "--output-dir", str(tmp_path / "out"))
    header, rows = _table(out, "model")
    assert header == ["model", "layers x width", "non-emb params", "vs teacher", "kd_weight", "steps", "valid ppl",
                      "test ppl", "valid word ppl", "test word ppl", "train tokens/s"]
    assert [r[0] for r in rows] == ["teacher", "student CE only", "student KD only", "student combined (0.5)"]
    for r in rows:
        for cell in (r[2], r[3]):
            _positive(cell)
        for cell in r[6:10]:  # the teacher: one figure; students: mean ± std over the 2 seeds
            parts = cell.split(" ± ")
            assert len(parts) == (1 if r[0] == "teacher" else 2), cell
            _positive(parts[0])
    assert [r[4] for r in rows[1:]] == ["0", "1", "0.5"]
    header, rel = _table(out, "student")
    assert header == ["student", "kd_weight", "valid ppl vs CE only", "test ppl vs CE only"]
    assert [r[1] for r in rel] == ["1", "0.5"]
    for r in rel:  # the change against CE only, seed by seed: mean ± std of the paired differences
        mean, std = (float(x) for x in r[2].rstrip("%").split(" ± "))
        assert std >= 0 and -100 < mean


def test_teacher_quality_quick():
    out = _run("teacher_quality.py", "--quick")  # the tests' tiny teacher: cached by the other tests
    header, rows = _table(out, "steps")
    assert header == ["steps", "world seed", "train s", "val_loss", "acc_completion", "acc_choice", "em_qa",
                      "acc_mean"]
    assert [r[:2] for r in rows] == [["150", "0"]]  # one seed: no mean ± std row
    assert _positive(rows[0][3]) and all(0 <= float(c) <= 1 for c in rows[0][4:])
    assert float(rows[0][5]) > 0.25  # the tiny teacher is above chance at multiple choice


def test_world_students_quick(tmp_path):
    out = _run("world_students.py", "--quick", "--seeds", "2", "--output-dir", str(tmp_path))
    header, rows = _table(out, "model")
    assert header == ["model", "kd_weight", "T", "val_loss", "acc_completion", "acc_choice", "em_qa", "f1_qa",
                      "acc_mean", "retention"]
    assert [r[0] for r in rows] == ["teacher", "student, CE only", "student, distillation only",
                                    "student, combined (0.5)"]
    assert [r[1] for r in rows] == ["-", "0", "1", "0.5"]
    _positive(rows[0][3])
    for r in rows[1:]:  # two seeds: every cell is "mean ± std"
        mean, std = (float(x) for x in r[3].split(" ± "))
        assert mean > 0 and std >= 0
        assert all(0.0 <= float(c.split(" ± ")[0]) <= 1.0 for c in r[4:9])  # accuracies are fractions
