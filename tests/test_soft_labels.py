"""The soft-label cache: built once, equal to the online teacher's top-k, checked before use.

On the tiny world with the tests' tiny teacher (tests/conftest.py). fp32 throughout so
that "equal" means equal up to the fp16 the cache stores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.config import ConfigError, TrainConfig, load_config
from kd.data import load_blocks
from kd.losses import distillation_loss
from kd.models import load_pretrained
from kd.soft_labels import (MANIFEST, SoftLabelsError, cache_key, ensure_soft_labels, load_soft_labels,
                            weights_fingerprint)
from kd.teacher import ensure_teacher
from kd.train import Hooks, _batches, online_teacher

K = 16


def _cfg(tiny: dict, tmp: Path | None = None, **extra):
    over = {**tiny, "train.precision": "fp32", "train.device": "cpu", "teacher.mode": "cache",
            "teacher.top_k": K, "teacher.soft_label_format": "topk", **extra}
    if tmp is not None:
        over["teacher.soft_labels_dir"] = str(tmp)
    return load_config(overrides=over)


@pytest.fixture(scope="module")
def world(tiny_overrides, tmp_path_factory):
    """The tiny teacher, its tokenizer and blocks, and a k=16 cache in a module temp dir."""
    cfg = _cfg(tiny_overrides, tmp_path_factory.mktemp("soft"))
    source = ensure_teacher(cfg)
    teacher, tok = load_pretrained(source)
    blocks = load_blocks(cfg.data, tok)
    labels = ensure_soft_labels(cfg, source, tok, blocks.train)
    return cfg, source, teacher.eval(), tok, blocks, labels


def test_cache_layout_and_manifest(world):
    cfg, source, _, tok, blocks, labels = world
    m = labels.manifest
    assert labels.path.name == m["fingerprint"] and labels.path.parent == Path(cfg.teacher.soft_labels_dir)
    n, length = blocks.train.shape
    assert m["shape"] == [n, length - 1, K] and m["k"] == K and m["vocab"] == len(tok)
    assert labels.indices.dtype == torch.int16 and labels.values.dtype == torch.float16
    assert m["key"] == cache_key(cfg, source, tok) and m["backend"] == "local"
    assert sum(s["n_blocks"] for s in m["shards"]) == n
    assert all(len(s["sha256"]) == 64 and (labels.path / s["file"]).stat().st_size == s["bytes"] for s in m["shards"])
    assert not [p for p in labels.path.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    # The temperature is not in the key: one cache serves a temperature sweep.
    assert cache_key(_cfg(dict(cfg_overrides(cfg)), **{"loss.temperature": 7.0}), source, tok) == m["key"]


def cfg_overrides(cfg) -> dict:
    from kd.config import to_flat_dict

    return {k: v for k, v in to_flat_dict(cfg).items() if k != "output_dir"}


def test_batches_carry_block_ids_that_the_reader_uses(world):
    cfg, _, teacher, tok, blocks, labels = world
    train_cfg = TrainConfig(batch_size=8, seed=3)
    batch = next(_batches(blocks.train, train_cfg, Hooks(), start_step=5))
    ids = batch["block_index"]
    assert torch.equal(batch["input_ids"], blocks.train[ids][:, :-1])
    out = labels.teacher_fn(torch.device("cpu"))(batch)
    assert out["topk_indices"].shape == (8, blocks.train.shape[1] - 1, K)
    # Top-k of the online teacher's logits == the cached ones (fp16), robust to ties:
    # the online logits at the cached ids are the cached values and the k largest.
    dense = online_teacher(teacher, len(tok), torch.device("cpu"), "fp32")(batch)["teacher_logits"]
    # (fp16 tolerance: the cache was computed in other batches, which may round differently.)
    fp16 = dict(rtol=2e-3, atol=2e-3)
    at_cached = dense.gather(-1, out["topk_indices"].long())
    torch.testing.assert_close(at_cached, out["topk_values"].float(), **fp16)
    torch.testing.assert_close(dense.topk(K, -1).values, out["topk_values"].float(), **fp16)
    # The online teacher with teacher.top_k gives the same targets.
    online_k = online_teacher(teacher, len(tok), torch.device("cpu"), "fp32", top_k=K)(batch)
    torch.testing.assert_close(online_k["topk_values"].float(), out["topk_values"].float(), **fp16)


@pytest.mark.parametrize("top_k", [0, "V"])
def test_dense_cache_gives_the_dense_loss(world, tmp_path, top_k):
    """The default (top_k=0) and k = V store every logit: the online teacher's loss up to fp16."""
    cfg, source, teacher, tok, _, _ = world
    k = len(tok) if top_k == "V" else top_k
    full = _cfg(cfg_overrides(cfg), tmp_path,
                **{"teacher.top_k": k, "data.max_blocks": 8, "teacher.soft_label_format": "auto"})
    blocks = load_blocks(full.data, tok)
    labels = ensure_soft_labels(full, source, tok, blocks.train)
    assert labels.manifest["k"] == len(tok) and labels.manifest["dense"] and labels.indices is None
    batch = {"input_ids": blocks.train[:, :-1], "labels": blocks.train[:, 1:], "block_index": torch.arange(8)}
    dense = online_teacher(teacher, len(tok), torch.device("cpu"), "fp32")(batch)
    sparse = labels.teacher_fn()(batch)
    torch.manual_seed(0)
    student = dense["teacher_logits"] * 0.7 + torch.randn_like(dense["teacher_logits"])
    for t in (1.0, 2.0, 8.0):
        ref = distillation_loss(student, batch["labels"], temperature=t, kd_weight=1.0, **dense).kd
        got = distillation_loss(student, batch["labels"], temperature=t, kd_weight=1.0, **sparse).kd
        assert abs(got - ref) / ref < 2e-3, (t, got, ref)  # fp16 logits: ~1e-3 relative


def test_student_from_cache_matches_online_within_the_topk_gap(world, tmp_path):
    """Cache (k=16) vs online top-16: same targets up to fp16; vs online dense: the top-k gap."""
    from kd.run import distill

    cfg = world[0]
    base = {**cfg_overrides(cfg), "loss.kd_weight": 1.0, "loss.temperature": 2.0, "train.eval_blocks": 0}
    runs = {}
    for name, extra in {"cache": {}, "online_topk": {"teacher.mode": "online"},
                        "online_dense": {"teacher.mode": "online", "teacher.top_k": 0}}.items():
        c = load_config(overrides={**base, **extra, "output_dir": str(tmp_path / name)})
        runs[name] = distill(c, evaluate=False)
    gap = abs(runs["online_topk"]["val_loss"] - runs["online_dense"]["val_loss"])
    assert abs(runs["cache"]["val_loss"] - runs["online_topk"]["val_loss"]) < 1e-3
    assert abs(runs["cache"]["val_loss"] - runs["online_dense"]["val_loss"]) <= gap + 1e-3
    assert abs(runs["cache"]["kd_loss"] - runs["online_topk"]["kd_loss"]) < 1e-3


def test_cache_mode_trial_never_loads_the_teacher(world, tmp_path, monkeypatch):
    """Once the cache and the teacher's figures exist, distill in cache mode runs without it."""
    import transformers

    import kd.models
    import kd.run
    from kd.run import distill, teacher_metrics

    cfg, source, teacher, tok, blocks, _ = world
    teacher_metrics(teacher, tok, source, cfg, blocks.val)  # what kd.sweep does before the trials
    real = transformers.AutoModelForCausalLM.from_pretrained

    def guarded(path, *a, **kw):
        if Path(str(path)).resolve() == Path(source).resolve():
            raise AssertionError("the teacher's weights were loaded in cache mode")
        return real(path, *a, **kw)

    def no_teacher(path, **kw):
        raise AssertionError(f"load_pretrained({path!r}) in cache mode")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", guarded)
    monkeypatch.setattr(kd.run, "load_pretrained", no_teacher)
    monkeypatch.setattr(kd.models, "load_pretrained", no_teacher)
    c = load_config(overrides={**cfg_overrides(cfg), "output_dir": str(tmp_path / "trial")})
    metrics = distill(c)
    assert metrics["kd_loss"] > 0 and "teacher_val_loss" in metrics and "acc_mean" in metrics
    assert (tmp_path / "trial" / "student" / "model.safetensors").exists()


@pytest.fixture()
def small_cache(world, tmp_path):
    cfg, source, _, tok, _, _ = world
    small = _cfg(cfg_overrides(cfg), tmp_path, **{"data.max_blocks": 8})
    blocks = load_blocks(small.data, tok)
    return small, source, tok, blocks, ensure_soft_labels(small, source, tok, blocks.train)


def test_corrupted_shard_is_detected_then_rebuilt(small_cache, capfd):
    cfg, source, tok, blocks, labels = small_cache
    # The reader memory-maps its shards, so keep the good values before damaging the file.
    good_values, good_indices = labels.values.clone(), labels.indices.clone()
    shard = labels.path / labels.manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the fp16 values
    shard.write_bytes(bytes(data))
    with pytest.raises(SoftLabelsError, match="fails its sha256 check") as e:
        load_soft_labels(labels.path, labels.manifest["key"])
    assert "\n" not in str(e.value)
    with pytest.raises(SoftLabelsError, match="sha256"):
        ensure_soft_labels(cfg, source, tok, blocks.train, on_bad="raise")
    rebuilt = ensure_soft_labels(cfg, source, tok, blocks.train)
    assert "fails its sha256 check (corrupted); rebuilding it" in capfd.readouterr().err
    assert torch.equal(rebuilt.values, good_values) and torch.equal(rebuilt.indices, good_indices)
    load_soft_labels(labels.path, labels.manifest["key"])  # good again


def test_fingerprint_mismatch_is_refused_or_rebuilt(small_cache, tmp_path):
    cfg, source, tok, blocks, labels = small_cache
    key = labels.manifest["key"]
    with pytest.raises(SoftLabelsError, match="fingerprint mismatch .*differs in k"):
        load_soft_labels(labels.path, {**key, "k": 4})
    manifest = json.loads((labels.path / MANIFEST).read_text())
    manifest["key"]["teacher"] = "0" * 16  # a cache of another teacher under this name
    (labels.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SoftLabelsError, match="differs in teacher"):
        ensure_soft_labels(cfg, source, tok, blocks.train, on_bad="raise")
    assert ensure_soft_labels(cfg, source, tok, blocks.train).manifest["key"] == key  # rebuilt
    # Different teacher weights give a different fingerprint (a copy with one weight changed).
    from safetensors.torch import load_file, save_file

    copy = Path(shutil.copytree(source, tmp_path / "teacher2"))
    weights = load_file(str(copy / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(str(copy)) != weights_fingerprint(source)


@pytest.mark.parametrize("damage", ["no shards", "shards not a list", "not an object"])
def test_broken_manifest_is_refused_in_one_line_then_rebuilt(small_cache, damage):
    cfg, source, tok, blocks, labels = small_cache
    manifest = json.loads((labels.path / MANIFEST).read_text())
    if damage == "no shards":
        del manifest["shards"]
    elif damage == "shards not a list":
        manifest["shards"] = "shard-00000.safetensors"
    else:
        manifest = [manifest]
    (labels.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SoftLabelsError) as e:
        ensure_soft_labels(cfg, source, tok, blocks.train, on_bad="raise")
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)
    rebuilt = ensure_soft_labels(cfg, source, tok, blocks.train)
    assert isinstance(rebuilt.manifest["shards"], list) and rebuilt.manifest["key"] == labels.manifest["key"]


def test_reader_maps_the_shards_and_copies_only_the_rows_asked_for(world):
    *_, labels = world
    values = labels.shards[0]["topk_values"]
    assert isinstance(values, np.memmap) and not values.flags.writeable  # no copy of the cache
    ids = np.array([5, 0, 5])
    got_values, got_indices = labels.lookup(ids)
    assert got_values.shape == (3, *labels.manifest["shape"][1:]) and got_values.flags.owndata
    assert np.array_equal(got_values[0], got_values[2])
    assert torch.equal(torch.from_numpy(got_values), labels.values[torch.from_numpy(ids)])
    assert torch.equal(torch.from_numpy(got_indices), labels.indices[torch.from_numpy(ids)])


def test_cache_directories_are_readable_by_other_users(world):
    # A cluster's nodes read the cache from shared storage: not mkdtemp's 0700.
    *_, labels = world
    umask = os.umask(0)
    os.umask(umask)
    assert labels.path.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("override, needle", [
    ("teacher.mode=offline", "teacher.mode='offline' is not allowed: choose one of online, cache"),
    ("teacher.top_k=-1", "teacher.top_k=-1 is not allowed: must be >= 0"),
])
def test_bad_values_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # a local Ray + a Ray Data actor: ~30 s on an idle 2-core machine
def test_ray_data_build_equals_the_local_one(world, tmp_path):
    """The teacher pass as Ray Data actors gives the same cache as the local loop; a sweep's
    preparation (kd.sweep.driver) on one CPU node builds it locally (4x faster there)."""
    import ray

    from kd.config import KDConfig, apply_overrides
    from kd.sweep.driver import _prepare_soft_labels

    cfg, source, _, tok, blocks, labels = world
    fixed = {**cfg_overrides(cfg), "teacher.soft_labels_dir": str(tmp_path / "ray")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="kdsl-", dir="/tmp"))
    try:
        ensure_soft_labels(apply_overrides(KDConfig(), fixed), source, tok, blocks.train, backend="ray")
        prepared = apply_overrides(KDConfig(), {**fixed, "teacher.soft_labels_dir": str(tmp_path / "driver")})
        _prepare_soft_labels(prepared)
    finally:
        ray.shutdown()
    built = load_soft_labels(tmp_path / "ray" / labels.path.name, labels.manifest["key"])
    assert built.manifest["backend"] == "ray"
    assert torch.equal(built.indices, labels.indices) and torch.equal(built.values, labels.values)
    local = load_soft_labels(tmp_path / "driver" / labels.path.name, labels.manifest["key"])
    assert local.manifest["backend"] == "local"
    assert torch.equal(local.indices, labels.indices) and torch.equal(local.values, labels.values)
