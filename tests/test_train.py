"""The training loop: it learns, distils, reports, checkpoints and resumes exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from factories import TEXTS, make_model, make_tokenizer
from kd.config import LossConfig, TrainConfig
from kd.train import online_teacher, train, validation_loss


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    ids = torch.tensor(sum((tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS), []))
    n = len(ids) // 24
    blocks = ids[: n * 24].view(n, 24)
    return tok, blocks[:-8], blocks[-8:]


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=10, eval_blocks=0,
                threads=1, precision="fp32", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_cross_entropy_training_lowers_validation_loss(setup):
    tok, tr, va = setup
    model = make_model(tok, n_layer=1, n_embd=32)
    before = validation_loss(model, va, len(tok), device=torch.device("cpu"), precision="fp32")
    seen = []
    final = train(model, tr, va, n_vocab=len(tok), loss_cfg=LossConfig(kd_weight=0.0), cfg=_cfg(steps=40),
                  report=lambda m, c: seen.append((m, c)))
    assert final["val_loss"] < before - 0.5
    assert [m["step"] for m, _ in seen] == [10, 20, 30, 40]
    assert all(c is None for _, c in seen)  # no checkpoint_dir: no checkpoints
    assert {"val_loss", "val_ppl", "train_loss", "ce_loss", "kd_loss", "tokens_per_s", "train_time_s"} <= set(final)
    assert final["kd_loss"] == 0.0 and final["tokens_per_s"] > 0


def test_distillation_pulls_student_toward_teacher(setup):
    tok, tr, va = setup
    teacher = make_model(tok, n_layer=2, n_embd=32, seed=1)
    train(teacher, tr, va, n_vocab=len(tok), loss_cfg=LossConfig(kd_weight=0.0), cfg=_cfg(steps=30))
    fn = online_teacher(teacher, len(tok), torch.device("cpu"), "fp32")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = make_model(tok, n_layer=1, n_embd=16, n_head=2, seed=2)
    loss = LossConfig(kd_weight=1.0, temperature=2.0)
    hist = []
    train(student, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(steps=30), teacher=fn,
          report=lambda m, c: hist.append(m))
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]
    assert hist[-1]["ce_loss"] > 0  # reported even when its weight is 0


def test_resume_continues_exactly(setup, tmp_path):
    tok, tr, va = setup
    loss = LossConfig(kd_weight=0.0)
    saved = {}

    def keep(m, ckpt):
        if m["step"] == 10:
            saved["ckpt"] = shutil.copytree(ckpt, tmp_path / "at10")

    a = make_model(tok, n_layer=1, n_embd=32, seed=3)
    full = train(a, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(), report=keep, checkpoint_dir=tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint" / "model.safetensors").exists()
    b = make_model(tok, n_layer=1, n_embd=32, seed=99)  # different init: the checkpoint must win
    resumed = train(b, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(), resume_from=saved["ckpt"])
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), k
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-5)


def test_nan_loss_stops_with_a_clear_error(setup):
    tok, tr, va = setup
    model = make_model(tok, n_layer=1, n_embd=32)
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        train(model, tr, va, n_vocab=len(tok), loss_cfg=LossConfig(kd_weight=0.0), cfg=_cfg(lr=1e30, grad_clip=0))


def test_distillation_without_teacher_is_refused(setup):
    tok, tr, va = setup
    with pytest.raises(ValueError, match="loss.kd_weight=0.5 needs a teacher"):
        train(make_model(tok), tr, va, n_vocab=len(tok), loss_cfg=LossConfig(kd_weight=0.5), cfg=_cfg())


def test_ctrl_c_stops_between_steps_with_a_checkpoint_that_resumes_exactly(setup, tmp_path):
    # SIGINT in the middle of a run (here from the report at step 10, as a user's Ctrl-C
    # arrives at any line): the loop finishes that step, saves, and raises; resuming from
    # that checkpoint gives the uninterrupted run's weights.
    import signal

    tok, tr, va = setup
    loss = LossConfig(kd_weight=0.0)
    full_model = make_model(tok, n_layer=1, n_embd=32, seed=4)
    full = train(full_model, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(eval_every=5))

    def interrupt(m, ckpt):
        if m["step"] == 10:
            signal.raise_signal(signal.SIGINT)

    a = make_model(tok, n_layer=1, n_embd=32, seed=4)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 10; checkpoint"):
        train(a, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(eval_every=5), report=interrupt,
              checkpoint_dir=tmp_path / "a")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    b = make_model(tok, n_layer=1, n_embd=32, seed=99)
    resumed = train(b, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(eval_every=5),
                    resume_from=tmp_path / "a" / "checkpoint")
    for (k, pa), pb in zip(full_model.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), k
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-5)


def test_compiled_step_trains_like_the_eager_one(setup):
    # train.compile=true: forward + loss as one inductor graph; same learning, to float
    # rounding (inductor reorders reductions), and the distillation term included. Without
    # dropout, as the project's teachers and students are: inductor draws its own masks.
    tok, tr, va = setup
    teacher = make_model(tok, n_layer=1, n_embd=32, seed=5)
    fn = online_teacher(teacher, len(tok), torch.device("cpu"), "fp32")
    loss = LossConfig(kd_weight=0.5, temperature=2.0)
    out = {}
    for mode in ("false", "true"):
        model = make_model(tok, n_layer=1, n_embd=32, seed=6)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        out[mode] = train(model, tr, va, n_vocab=len(tok), loss_cfg=loss, cfg=_cfg(compile=mode), teacher=fn)
    for key in ("val_loss", "train_loss", "ce_loss", "kd_loss"):
        assert out["true"][key] == pytest.approx(out["false"][key], rel=1e-3), key


def test_a_failing_compile_falls_back_to_eager_with_one_warning(setup, capfd, monkeypatch):
    # No working C++ compiler for inductor's CPU kernels: one warning line, then eager.
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # else a warm cache would skip the compiler
    tok, tr, va = setup
    torch._dynamo.reset()
    model = make_model(tok, n_layer=1, n_embd=24, seed=7)
    final = train(model, tr, va, n_vocab=len(tok), loss_cfg=LossConfig(kd_weight=0.0), cfg=_cfg(compile="true"))
    torch._dynamo.reset()
    err = [line for line in capfd.readouterr().err.splitlines() if "torch.compile failed" in line]
    assert len(err) == 1 and "training eagerly" in err[0]
    assert final["val_loss"] > 0 and final["step"] == 20


def test_auto_compiles_only_long_single_process_runs():
    from kd.step import AUTO_COMPILE_MIN_STEPS, should_compile

    assert should_compile("auto", AUTO_COMPILE_MIN_STEPS) and not should_compile("auto", AUTO_COMPILE_MIN_STEPS - 1)
    assert not should_compile("auto", 10 * AUTO_COMPILE_MIN_STEPS, world_size=2)
    assert should_compile("true", 1) and not should_compile("false", 10**6)
