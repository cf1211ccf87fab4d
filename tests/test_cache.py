"""One place for caches (kd.cache): atomic publishing, fingerprints, and keys that cover
every input of data blocks, teachers, teacher metrics and soft labels (issue 14, item 8)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from factories import make_model, make_tokenizer, save_pretrained_pair
from kd.config import DataConfig, load_config
from kd.data import blocks_fingerprint, load_blocks

KD = Path(__file__).resolve().parents[1] / "kd"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _docs(tag: str, n: int = 120) -> str:
    return "\n".join(f"{tag} document {i}: the quick brown fox jumps over the lazy dog." for i in range(n))


# ---------------------------------------------------------------- publishing


def test_every_temp_then_rename_goes_through_kd_cache():
    """No module of kd renames files into place itself: kd.cache does it for all of them."""
    offenders = []
    for path in sorted(KD.rglob("*.py")):
        if path.name == "cache.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.relative_to(KD)}:{node.lineno}")
    assert not offenders, f"temp-then-rename outside kd.cache: {offenders}"


def test_kd_cache_imports_nothing_from_kd():
    tree = ast.parse((KD / "cache.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "kd" or n.startswith("kd.")]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    from kd.cache import atomic_file, write_atomic

    path = tmp_path / "entry.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["entry.json"]
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_published_files_and_dirs_are_readable_as_the_umask_allows(tmp_path):
    """mkstemp/mkdtemp alone make 0600/0700 entries other users of a shared cache cannot read."""
    from kd.cache import building_dir, write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f", b"x")
        with building_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755 and (tmp_path / "d" / "a").read_text() == "x"


def test_building_dir_publishes_whole_or_nothing_and_keeps_a_complete_rival(tmp_path):
    from kd.cache import building_dir

    def complete(p: Path) -> bool:
        return (p / "done").exists()

    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with building_dir(target, complete) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # nothing published, no temp dir left
    target.mkdir()
    (target / "leftover").write_text("x")  # an incomplete entry is replaced
    with building_dir(target, complete) as tmp:
        (tmp / "done").write_text("ours")
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    with building_dir(target, complete) as tmp:  # a complete one (another process's) is kept
        (tmp / "done").write_text("late")
    assert (target / "done").read_text() == "ours" and [p.name for p in tmp_path.iterdir()] == ["entry"]


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_is_canonical_json_and_strict():
    from kd.cache import canonical_json, fingerprint

    @dataclasses.dataclass
    class Key:
        a: int = 1
        b: tuple = (1.5, "x")

    assert fingerprint({"a": 1, "b": [1.5, "x"]}) == fingerprint({"b": [1.5, "x"], "a": 1}) == fingerprint(Key())
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint({})) == 16
    assert canonical_json({"b": 1, "a": Path("/x")}) == '{"a":"/x","b":1}'
    with pytest.raises(TypeError, match="cache key"):
        fingerprint({"a": object()})  # would be a different text in every process
    with pytest.raises(ValueError):
        fingerprint({"a": float("nan")})


def test_file_digest_memo_follows_edits(tmp_path):
    from kd.cache import file_digest, sha256_file

    f, memo = tmp_path / "data.txt", tmp_path / "memo.json"
    f.write_text("aaaa")
    first = file_digest(f, memo)
    assert first == sha256_file(f) and first in json.loads(memo.read_text()).values()
    st = f.stat()
    f.write_text("bbbb")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_digest(f, memo) == sha256_file(f) != first


# ------------------------------------------------------- data: keyed by contents


def test_an_edited_local_file_gives_a_new_key_and_fresh_blocks(tmp_path, tok):
    """The key of a local file is its contents, not its path: an edit is packed again."""
    f = tmp_path / "corpus.txt"
    f.write_text(_docs("old"))
    cfg = DataConfig(source=str(f), block_size=16)
    before_key, before = blocks_fingerprint(cfg, tok), load_blocks(cfg, tok)
    f.write_text(_docs("new", 150))
    after_key, after = blocks_fingerprint(cfg, tok), load_blocks(cfg, tok)
    assert after_key != before_key
    docs = _docs("new", 150).split("\n")
    tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + eos each
    assert after.train.shape[0] + after.val.shape[0] == tokens // 16  # packed from the new text
    assert before.train.shape[0] + before.val.shape[0] < tokens // 16


def test_the_same_text_at_another_path_shares_the_key_and_a_split_rename_does_not(tmp_path, tok):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "train.txt").write_text(_docs("same"))
        (d / "extra.txt").write_text(_docs("more", 40))
    assert blocks_fingerprint(DataConfig(source=str(a)), tok) == blocks_fingerprint(DataConfig(source=str(b)), tok)
    (b / "extra.txt").rename(b / "valid.txt")  # same bytes, now the validation split
    assert blocks_fingerprint(DataConfig(source=str(a)), tok) != blocks_fingerprint(DataConfig(source=str(b)), tok)


# ----------------------------------------------------- teacher: every input keyed


def _cfg(tiny: dict, **extra):
    return load_config(overrides={**tiny, **extra})


@pytest.mark.parametrize("override", [{"train.weight_decay": 0.0}, {"train.grad_clip": 0.5},
                                      {"train.grad_clip": 0}, {"teacher.lr": 1e-3}, {"data.block_size": 64},
                                      {"teacher.seed": 1}])
def test_every_setting_that_changes_the_teachers_weights_changes_its_key(tiny_overrides, tok, override):
    from kd.teacher import teacher_fingerprint

    base = teacher_fingerprint(_cfg(tiny_overrides, **{"train.precision": "fp32"}), tok)
    assert teacher_fingerprint(_cfg(tiny_overrides, **{"train.precision": "fp32", **override}), tok) != base


def test_the_teacher_seed_is_keyed_once_where_seed_0_always_was(tiny_overrides, tok):
    """teacher.seed enters the key as the training config's seed, which was 0 before the
    knob existed: a seed-0 teacher trained then keeps its cache entry."""
    from kd.teacher import teacher_key

    key = teacher_key(_cfg(tiny_overrides), tok, "fp32")
    assert "seed" not in key["teacher"] and key["train"]["seed"] == 0
    assert teacher_key(_cfg(tiny_overrides, **{"teacher.seed": 5}), tok, "fp32")["train"]["seed"] == 5


@pytest.mark.parametrize("override", [{"train.steps": 7}, {"train.lr": 0.1}, {"train.seed": 3},
                                      {"train.eval_blocks": 2}, {"train.threads": 1}, {"train.device": "cpu"},
                                      {"train.compile": "false"}, {"loss.temperature": 4.0},
                                      {"teacher.trust_remote_code": True}, {"teacher.top_k": 32},
                                      {"teacher.mode": "cache"}, {"teacher.soft_label_format": "compact"},
                                      {"teacher.grid_points": 5}, {"teacher.soft_labels_dir": "/x"},
                                      {"teacher.tail_samples": 0}, {"teacher.proposal_temperature": 2.0}])
def test_settings_that_do_not_change_the_teacher_leave_its_key(tiny_overrides, tok, override):
    """The student's schedule, evaluation, rounding-only settings and the soft labels'
    settings (the teacher's outputs, not its weights): one teacher serves them all."""
    from kd.teacher import teacher_fingerprint

    base = teacher_fingerprint(_cfg(tiny_overrides, **{"train.precision": "fp32"}), tok)
    assert teacher_fingerprint(_cfg(tiny_overrides, **{"train.precision": "fp32", **override}), tok) == base


def test_every_soft_label_setting_is_out_of_the_teachers_key():
    """The soft-label cache's own teacher.* settings (its key holds them) are the teacher's
    outputs, not its weights: none of them may retrain the teacher."""
    import inspect

    import kd.compact
    import kd.soft_labels
    from kd.config import TeacherConfig
    from kd.teacher import NOT_WEIGHTS

    source = inspect.getsource(kd.soft_labels) + inspect.getsource(kd.compact)
    read = {f.name for f in dataclasses.fields(TeacherConfig) if f"teacher.{f.name}" in source or f"t.{f.name}" in source}
    shape = {"arch", "n_layer", "n_embd", "n_head", "steps", "batch_size", "lr"}
    assert read - shape and read - shape <= set(NOT_WEIGHTS), sorted(read - shape - set(NOT_WEIGHTS))


def test_an_edited_local_file_gives_a_new_teacher_key(tiny_overrides, tok, tmp_path):
    """The teacher learns from the blocks: an edited corpus trains a new one, not the stale one."""
    from kd.teacher import teacher_fingerprint

    f = tmp_path / "corpus.txt"
    f.write_text(_docs("old"))
    cfg = _cfg(tiny_overrides, **{"data.source": str(f), "train.precision": "fp32"})
    before = teacher_fingerprint(cfg, tok)
    f.write_text(_docs("new", 150))
    assert teacher_fingerprint(cfg, tok) != before


@pytest.mark.parametrize("fast", [False, True])
def test_precision_auto_is_resolved_before_it_enters_a_key(tiny_overrides, tok, monkeypatch, tmp_path, fast):
    """``auto`` on a CPU is bf16 where bf16 is fast, else fp32: the keys say which."""
    import kd.device
    from kd.soft_labels import cache_key
    from kd.teacher import teacher_fingerprint

    monkeypatch.setattr(kd.device, "cpu_bf16_is_fast", lambda: fast)
    model_dir = save_pretrained_pair(tmp_path / "t", tok, make_model(tok))
    resolved = "bf16" if fast else "fp32"

    def cfg(precision: str):
        return _cfg(tiny_overrides, **{"train.device": "cpu", "train.precision": precision})

    assert teacher_fingerprint(cfg("auto"), tok) == teacher_fingerprint(cfg(resolved), tok)
    assert cache_key(cfg("auto"), str(model_dir), tok) == cache_key(cfg(resolved), str(model_dir), tok)
    assert cache_key(cfg("auto"), str(model_dir), tok)["precision"] == resolved
    other = "fp32" if fast else "bf16"
    assert teacher_fingerprint(cfg(other), tok) != teacher_fingerprint(cfg(resolved), tok)


def test_auto_reuses_a_teacher_another_machine_built_in_the_other_precision(tiny_overrides, monkeypatch,
                                                                            tmp_path):
    """A sweep trains its teacher once on the driver's machine; ``auto`` trials elsewhere
    (bf16 there) use it instead of training their own. An explicit precision does not."""
    import shutil

    import kd.device
    import kd.teacher

    fp32 = _cfg(tiny_overrides, **{"train.precision": "fp32"})
    shared = Path(kd.teacher.ensure_teacher(fp32))  # the tests' tiny teacher, in fp32
    # A cache holding only that fp32 entry: the session's shared cache may also hold a bf16
    # one (other tests' ``auto`` on a CPU where bf16 is fast), which ``auto`` rightly prefers.
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    built = tmp_path / "teachers" / shared.name
    shutil.copytree(shared, built)
    built = str(built)
    monkeypatch.setattr(kd.device, "cpu_bf16_is_fast", lambda: True)  # "another machine": auto is bf16 here

    def no_training(*a, **k):
        raise AssertionError("trained a teacher")

    monkeypatch.setattr(kd.teacher, "train", no_training)
    assert kd.teacher.ensure_teacher(_cfg(tiny_overrides, **{"train.precision": "auto"})) == built
    with pytest.raises(AssertionError, match="trained a teacher"):
        kd.teacher.ensure_teacher(_cfg(tiny_overrides, **{"train.precision": "bf16"}))


def test_auto_reuses_soft_labels_built_in_the_other_precision(tiny_overrides, monkeypatch, tmp_path):
    """The same for the soft labels a sweep's driver builds: an ``auto`` trial reads them."""
    import kd.device
    import kd.soft_labels
    from kd.models import load_tokenizer
    from kd.teacher import ensure_teacher

    def cfg(precision: str):
        return _cfg(tiny_overrides, **{"train.precision": precision, "train.device": "cpu",
                                       "teacher.mode": "cache", "teacher.soft_labels_dir": str(tmp_path)})

    source = ensure_teacher(cfg("fp32"))
    tok = load_tokenizer(source)
    blocks = load_blocks(cfg("fp32").data, tok)
    built = kd.soft_labels.ensure_soft_labels(cfg("fp32"), source, tok, blocks.train)
    assert built.manifest["key"]["precision"] == "fp32"
    monkeypatch.setattr(kd.device, "cpu_bf16_is_fast", lambda: True)  # "another machine": auto is bf16 here

    def no_build(*a, **k):
        raise AssertionError("ran the teacher pass")

    monkeypatch.setattr(kd.soft_labels, "build_local", no_build)
    assert kd.soft_labels.ensure_soft_labels(cfg("auto"), source, tok, blocks.train).path == built.path
    with pytest.raises(AssertionError, match="ran the teacher pass"):
        kd.soft_labels.ensure_soft_labels(cfg("bf16"), source, tok, blocks.train)


def test_teacher_metrics_are_keyed_by_the_teachers_weights_not_its_path(tiny_overrides, tok, tmp_path, monkeypatch):
    """A teacher directory rewritten with other weights gets its own reference figures."""
    import kd.run

    monkeypatch.setattr(kd.run, "evaluate_model", lambda *a, **k: {})  # val_loss alone tells them apart
    cfg = _cfg(tiny_overrides, **{"train.precision": "fp32", "train.device": "cpu"})
    val = torch.randint(0, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    teacher_dir = tmp_path / "teacher"
    save_pretrained_pair(teacher_dir, tok, make_model(tok, seed=0))
    first = kd.run.teacher_metrics(make_model(tok, seed=0), tok, str(teacher_dir), cfg, val)
    second_model = make_model(tok, seed=1)
    save_pretrained_pair(teacher_dir, tok, second_model)
    second = kd.run.teacher_metrics(second_model, tok, str(teacher_dir), cfg, val)
    assert second["val_loss"] != first["val_loss"]
    again = kd.run.teacher_metrics(None, tok, str(teacher_dir), cfg, val, load=lambda: 1 / 0)  # cached now
    assert again == second


def test_a_local_teachers_key_covers_its_weights_and_its_config(tok, tmp_path):
    """Soft labels and teacher metrics name a local teacher by what its directory holds."""
    from kd.soft_labels import weights_fingerprint

    teacher_dir = save_pretrained_pair(tmp_path / "teacher", tok, make_model(tok, seed=0))
    first = weights_fingerprint(str(teacher_dir))
    config = json.loads((teacher_dir / "config.json").read_text())
    (teacher_dir / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-3}))
    assert weights_fingerprint(str(teacher_dir)) != first  # same weights, other logits
    save_pretrained_pair(teacher_dir, tok, make_model(tok, seed=1))
    assert len({first, weights_fingerprint(str(teacher_dir))}) == 2


def test_teacher_vocab_size_sets_the_trained_tokenizer_and_keys_the_teacher(tiny_overrides, tmp_path):
    """teacher.vocab_size: the BPE trained on a user's corpus has that many ids, and a teacher
    of another vocabulary gets another key (through its tokenizer, in the blocks' fingerprint)."""
    import random

    from kd.teacher import data_tokenizer, teacher_fingerprint

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(2000)) + "\n")
    sizes, keys = [], []
    for vocab in (512, 1536):
        cfg = _cfg(tiny_overrides, **{"data.source": str(f), "train.precision": "fp32", "teacher.vocab_size": vocab})
        tok = data_tokenizer(cfg)
        sizes.append(len(tok))
        keys.append(teacher_fingerprint(cfg, tok))
    assert sizes[0] <= 512 < 1400 < sizes[1] <= 1536, sizes
    assert keys[0] != keys[1]
