"""Config: defaults, YAML + overrides, and a one-line error for every bad value."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from kd.config import (ALLOWED, COMPILE_MODES, DEVICES, DIVERGENCES, ConfigError, KDConfig, describe_keys,
                       field_docs, flat_keys, load_config, to_flat_dict, validate)


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
        ("teacher.n_embd=250", "teacher.n_embd=250 is not allowed: must be divisible by teacher.n_head=3"),
        ("student.n_embd=100", "student.n_embd=100 is not allowed: must be divisible by the teacher's head size 64"),
        ("data.source=/no/such/dir", "data.source='/no/such/dir' is not allowed: a local path must exist"),
        ("teacher.source=./missing-teacher", "teacher.source='./missing-teacher' is not allowed"),
        ("train.steps=abc", "train.steps='abc' is not allowed: expected an integer"),
        ("teacher.vocab_size=100", "teacher.vocab_size=100 is not allowed: must be in [512, 262144]"),
        ("teacher.vocab_size=32000", "teacher.vocab_size=32000 is not allowed: applies to a tokenizer trained on"),
        ("loss.temprature=2", "unknown config key 'loss.temprature'; did you mean 'loss.temperature'?"),
        ("temperature=2", "did you mean 'loss.temperature'?"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.top_k=64", "loss.top_k=64 is not allowed: the key moved to teacher.top_k (integer in [0, 65536]); "
                          "use teacher.top_k=64"),
        ("loss.teacher_mode=cache", "loss.teacher_mode='cache' is not allowed: the key moved to teacher.mode "
                                    "(online | cache); use teacher.mode=cache"),
        ("loss.soft_labels_dir=/x", "the key moved to teacher.soft_labels_dir"),
        ("loss.soft_label_format=compact", "the key moved to teacher.soft_label_format"),
        ("loss.grid_min_temperature=1", "loss.grid_min_temperature=1.0 is not allowed: the key moved to "
                                        "teacher.grid_min_temperature (number > 0)"),
        ("loss.grid_max_temperature=16", "the key moved to teacher.grid_max_temperature"),
        ("loss.grid_points=5", "the key moved to teacher.grid_points (integer in [2, 64]); use teacher.grid_points=5"),
    ],
)
def test_soft_label_keys_moved_to_the_teacher_and_the_old_names_are_refused(override, needle, tmp_path):
    """The soft-label settings describe the teacher's outputs (issue 14): the old loss.* names
    are refused in one line, from --set and from a YAML file alike, naming the new key."""
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    key, value = override.split("=")
    section, leaf = key.split(".")
    f = tmp_path / "c.yaml"
    f.write_text(f"{section}:\n  {leaf}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value)
    new = e.value.args[0].split("the key moved to ")[1].split(" ")[0]
    assert new in flat_keys() and new.startswith("teacher.")
    assert load_config(overrides=[f"{new}={value}"])  # the new name takes the same value


def test_missing_yaml_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="the file does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["loss.temperature"])



@pytest.mark.parametrize("override", ["loss.temperature=inf", "loss.temperature=nan", "loss.kd_weight=-inf",
                                      "train.lr=inf", "teacher.lr=NaN", "data.val_fraction=inf"])
def test_non_finite_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is not allowed: expected a finite number$"):
        load_config(overrides=[override])


def test_validate_refuses_non_finite_values_set_in_code():
    """A search space hands values to validate() without the command line's parsing."""
    cfg = KDConfig()
    cfg.loss.temperature = math.inf
    with pytest.raises(ConfigError, match=r"loss.temperature=inf is not allowed: expected a finite number"):
        validate(cfg)


def test_an_existing_relative_path_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "my_teacher").mkdir()
    cfg = load_config(overrides=["data.source=mydata", "teacher.source=my_teacher", "student.n_head=2"])
    # Absolute, so that it stays the same folder in a sweep trial's working directory.
    assert cfg.data.source == str(tmp_path / "mydata")
    assert cfg.teacher.source == str(tmp_path / "my_teacher")
    # What does not exist stays a hub id; the reserved words are never paths.
    (tmp_path / "world").mkdir()
    (tmp_path / "train").mkdir()
    cfg = load_config(overrides=["data.source=wikitext", "teacher.source=train"])
    assert cfg.data.source == "wikitext" and cfg.teacher.source == "train"
    assert load_config().data.source == "world"


@pytest.mark.parametrize("text, where, reason", [
    ("loss:\n  temperature: 2\n   kd_weight: 0.5\n", ":3:13:", "mapping values are not allowed here"),
    ("loss: {temperature: 2\n", ":2:1:", "expected ',' or '}'"),
    ("loss:\n\ttemperature: 2\n", ":2:1:", "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, where, reason):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"YAML syntax error at {f}{where}" in msg and reason in msg, msg


def _config_classes() -> list[type]:
    import kd.config

    return [c for c in vars(kd.config).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == "kd.config"]


def test_every_config_field_has_a_docstring():
    classes = _config_classes()
    assert KDConfig in classes and len(classes) >= 6
    missing = [f"{c.__name__}.{name}" for c in classes for name, doc in field_docs(c).items() if not doc.strip()]
    assert missing == []


def test_every_key_says_what_it_allows():
    assert set(ALLOWED) == set(flat_keys())
    described = {key: (default, allowed) for key, default, allowed, _ in describe_keys()}
    assert described["loss.temperature"] == ("2.0", "number > 0")
    assert described["train.compile"] == ("auto", "auto | true | false")
    assert described["student.source"][0] == "''"
    # The choices shown are the ones validate() accepts.
    for key, choices in (("loss.divergence", DIVERGENCES), ("train.device", DEVICES), ("train.compile", COMPILE_MODES)):
        for choice in choices:
            assert choice in described[key][1]
            load_config(overrides=[f"{key}={choice}"])


@pytest.mark.parametrize("overrides, needle", [
    (["student.init=teacher", "student.n_embd=512"],
     "student.n_embd=512 is not allowed: must be at most teacher.n_embd=192 when student.init=teacher"),
    (["student.init=teacher", "student.n_embd=128", "student.n_head=4"],
     "student.n_head=4 is not allowed: must keep the teacher's head size 64 when student.init=teacher"),
])
def test_init_from_teacher_needs_a_slice_of_the_teacher(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)
    load_config(overrides=["student.init=teacher", "student.n_embd=128"])  # a narrower slice is fine
