"""Config: defaults, YAML + overrides, and a one-line error for every bad value."""

from __future__ import annotations

import pytest

from kd.config import ConfigError, KDConfig, flat_keys, load_config, to_flat_dict


def test_defaults_validate_and_flatten():
    cfg = load_config()
    flat = to_flat_dict(cfg)
    assert set(flat) == set(flat_keys())
    assert flat["loss.temperature"] == 2.0 and flat["teacher.source"] == "train"


def test_yaml_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  temperature: 4\n  kd_weight: 0.25\nstudent.n_layer: 3\n")
    cfg = load_config(f, ["loss.temperature=8", "train.precision=fp32"])
    assert cfg.loss.temperature == 8.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.loss.kd_weight == 0.25 and cfg.student.n_layer == 3 and cfg.train.precision == "fp32"


def test_overrides_do_not_mutate_defaults():
    load_config(overrides=["loss.temperature=9"])
    assert KDConfig().loss.temperature == 2.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.temperature=0", "loss.temperature=0.0 is not allowed: must be > 0"),
        ("loss.temperature=-1", "loss.temperature=-1.0 is not allowed: must be > 0"),
        ("loss.kd_weight=1.5", "loss.kd_weight=1.5 is not allowed: must be in [0, 1]"),
        ("loss.kd_weight=-0.1", "loss.kd_weight=-0.1 is not allowed"),
        ("loss.divergence=kl", "loss.divergence='kl' is not allowed: choose one of forward_kl"),
        ("student.n_head=3", "student.n_embd=128 is not allowed: must be divisible by student.n_head=3"),
        ("teacher.n_embd=250", "teacher.n_embd=250 is not allowed: must be divisible by teacher.n_head=4"),
        ("student.n_embd=100", "student.n_embd=100 is not allowed: must be divisible by the teacher's head size 64"),
        ("data.source=/no/such/dir", "data.source='/no/such/dir' is not allowed: a local path must exist"),
        ("teacher.source=./missing-teacher", "teacher.source='./missing-teacher' is not allowed"),
        ("train.steps=abc", "train.steps='abc' is not allowed: expected an integer"),
        ("loss.temprature=2", "unknown config key 'loss.temprature'; did you mean 'loss.temperature'?"),
        ("temperature=2", "did you mean 'loss.temperature'?"),
        ("student.init=teacher", "student.n_embd=128 is not allowed: must equal teacher.n_embd=256"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_yaml_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="the file does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["loss.temperature"])

