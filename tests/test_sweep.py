"""Fast checks of the sweep layer: declarations, presets, objectives, errors before Ray starts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd.config import ConfigError, KDConfig, apply_overrides
from kd.sweep import (PRESETS, Choice, IntRange, LogUniform, SweepSpec, Uniform, check_objectives, check_space,
                      check_sweep)
from kd.sweep.spec import fixed_overrides

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ["temperature", "loss_weight", "student_size", "pareto"]


def load_spec(name: str) -> SweepSpec:
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SPEC


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_shipped_sweep_validates_for_every_preset(name, preset):
    spec = load_spec(name)
    base = check_sweep(spec, preset)
    assert isinstance(base, KDConfig)
    space, points = spec.for_preset(preset)
    assert not set(fixed_overrides(spec, preset)) & set(space), "a searched key must not also be fixed"
    assert spec.budget[preset] >= 1
    if preset == "demo" and name == "temperature":
        assert spec.budget["demo"] >= 8  # the main job's promise


def test_sweep_declarations_match_the_issue():
    t = load_spec("temperature")
    assert t.space == {"loss.temperature": LogUniform(0.5, 20.0)} and t.objectives == ["acc_mean"]
    lw = load_spec("loss_weight")
    assert lw.space["loss.kd_weight"] == Uniform(0.0, 1.0)
    assert lw.points[0] == {"loss.kd_weight": 0.0}, "the CE-only baseline is the first trial"
    ss = load_spec("student_size")
    assert set(ss.space) == {"student.n_layer", "student.n_embd"}
    p = load_spec("pareto")
    assert set(p.space) == {"loss.temperature", "loss.kd_weight", "student.n_layer", "student.n_embd"}
    assert [(m, d) for m, d in check_objectives(p.objectives)] == [
        ("acc_mean", "max"), ("params", "min"), ("latency_ms_per_token", "min")]


def test_sweep_scripts_are_thin_and_import_only_kd():
    for name in SWEEPS:
        text = (ROOT / "sweeps" / f"{name}.py").read_text()
        assert f"python sweeps/{name}.py --preset demo" in text
        assert f"ray submit cluster.yaml sweeps/{name}.py --preset full" in text
        imports = [ln for ln in text.splitlines() if ln.startswith(("import ", "from "))]
        assert all(ln in ("import sys",) or ln.startswith("from kd") for ln in imports), imports
        assert len(text.splitlines()) <= 90


def test_space_corners_are_validated():
    fixed = apply_overrides(KDConfig(), PRESETS["demo"])
    check_space({"loss.temperature": LogUniform(0.5, 20.0)}, fixed)
    with pytest.raises(ConfigError, match="loss.temperature"):
        check_space({"loss.temperature": Uniform(0.0, 2.0)}, fixed)  # T=0 is a corner
    with pytest.raises(ConfigError, match="log scale"):
        check_space({"loss.temperature": LogUniform(0.0, 2.0)}, fixed)
    with pytest.raises(ConfigError, match="low"):
        check_space({"loss.kd_weight": Uniform(0.8, 0.2)}, fixed)
    with pytest.raises(ConfigError, match="loss.kd_weight"):
        check_space({"loss.kd_weight": Uniform(0.0, 1.5)}, fixed)
    with pytest.raises(ConfigError, match="student.n_embd"):  # 100 is not a multiple of 64
        check_space({"student.n_embd": Choice([64, 100])}, fixed)
    with pytest.raises(ConfigError, match="did you mean 'loss.temperature'"):
        check_space({"loss.temprature": LogUniform(0.5, 2.0)}, fixed)


def test_objectives_take_names_and_directions_from_kd_metrics():
    assert check_objectives(["val_loss"]) == [("val_loss", "min")]
    with pytest.raises(ConfigError, match="accuracy"):
        check_objectives(["accuracy"])
    with pytest.raises(ConfigError):
        check_objectives([])


def test_searched_key_cannot_also_be_set():
    with pytest.raises(ConfigError, match="what this sweep searches"):
        check_sweep(load_spec("temperature"), "demo", {"loss.temperature": 3.0})


def test_tune_space_and_searcher():
    from ray import tune

    from kd.sweep.search import searcher, to_tune

    dims = {"a": LogUniform(0.5, 20.0), "b": Uniform(0, 1), "c": IntRange(1, 4), "d": Choice([64, 128])}
    space = to_tune(dims)
    assert isinstance(space["a"], tune.search.sample.Float) and space["a"].lower == 0.5
    assert space["c"].upper == 5, "IntRange includes its high end; Tune's randint excludes it"
    assert space["d"].categories == [64, 128]
    one = searcher(["acc_mean"], dims, seed=0, budget=8)
    assert one.metric == "acc_mean" and one.mode == "max"
    many = searcher(["acc_mean", "params", "latency_ms_per_token"], dims, seed=0, budget=8,
                    points=[{"a": 1.0}])
    assert many.metric == ["acc_mean", "params", "latency_ms_per_token"]
    assert many.mode == ["max", "min", "min"]


def test_error_line_finds_the_exception():
    from kd.sweep.mlflow import error_line as _error_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise FloatingPointError(...)\n"
          "FloatingPointError: loss is nan at step 3; lower train.lr (now 1e+30) or check the data\n")
    assert _error_line(tb).startswith("FloatingPointError: loss is nan at step 3")
    wrapped = ("ray.exceptions.RayTaskError(FloatingPointError): ray::f() (pid=1)\n" + tb)
    assert _error_line(wrapped).startswith("FloatingPointError: loss is nan")
    assert _error_line(None) == "unknown error"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "--preset='huge' is not allowed: choose one of smoke, demo, full"),
    (["--set", "loss.kd_weight=1.5"], "loss.kd_weight=1.5 is not allowed: must be in [0, 1]"),
    (["--set", "student.n_embd=100"], "student.n_embd=100 is not allowed"),
    (["--set", "train.stepz=3"], "did you mean 'train.steps'"),
    (["--set", "loss.temperature=3"], "is what this sweep searches"),
    (["--resume"], "no sweep to resume"),
    (["--trials", "0"], "--trials=0 is not allowed"),
    (["--max-concurrent", "0"], "--max-concurrent=0 is not allowed: must be >= 1"),
    (["--max-concurrent", "-1"], "--max-concurrent=-1 is not allowed: must be >= 1"),
    (["--max-failures", "-2"], "--max-failures=-2 is not allowed: must be >= 0, or -1 for no limit"),
])
def test_bad_input_exits_with_one_line_before_ray_or_files(tmp_path, args, message):
    out = tmp_path / "out"
    proc = _run([str(ROOT / "sweeps" / "temperature.py"), "--output-dir", str(out), *args], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists(), "nothing may be written for a bad configuration"
    assert not (tmp_path / "cache").exists()


def test_an_output_dir_or_cache_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    """A file where a folder must be (the same check finds a read-only mount): one line,
    before Ray, the teacher or any folder (issue 15)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for where in (blocker, blocker / "sub"):
        proc = _run([str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke", "--output-dir", str(where)],
                    tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--output-dir=" in lines[0] and "is a file, not a directory" in lines[0], lines
    out = tmp_path / "out"
    env = {**os.environ, "KD_CACHE_DIR": str(blocker)}
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke",
                           "--output-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: KD_CACHE_DIR='{blocker}' is not allowed: it is a file" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists(), "a sweep that never started leaves no folder"


def test_sweep_cli_does_not_import_ray_or_mlflow():
    code = ("import sys, kd.sweep, kd.sweep.cli, kd.sweep.spec, kd.sweep.results; "
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_output_dir_is_new_each_run_and_resume_finds_the_latest(tmp_path, monkeypatch):
    from kd.sweep.cli import _output_dir

    monkeypatch.chdir(tmp_path)
    first = _output_dir("temperature", None, resume=False)
    assert first.parent == tmp_path / "runs" / "sweeps" / "temperature"
    first.mkdir(parents=True)
    (first / "sweep.json").write_text("{}")
    second = _output_dir("temperature", None, resume=False)
    assert second != first and not second.exists()
    second.mkdir()
    (second / "sweep.json").write_text("{}")
    assert _output_dir("temperature", None, resume=True) == max(first, second)
    assert _output_dir("temperature", str(tmp_path / "x"), resume=True) == tmp_path / "x"
