"""A small MLflow store in exactly the layout of kd/CONTRACTS.md, for the analysis tests.

One experiment (``pareto``) with an older sweep (one child) and the current sweep: a
parent run with the teacher's ``teacher_*`` metrics and 12 finished children that vary
temperature (with two seeds), kd_weight and the student's depth and width, plus one
FAILED child (tag ``kd.error``, a partial val_loss history, no final metrics). Metric
values come from a formula, so the front and the temperature optimum are known.

Used by the tests as ``build_store(dir)``; building is idempotent and cached on disk, so
several test modules share one store per session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENT = "pareto"
VOCAB = 512
STEPS = (100, 200, 300)

# (n_layer, n_embd, temperature, kd_weight, seed)
TRIALS = [
    # temperature sweep at 2x128, kd_weight 0.5, two seeds
    (2, 128, 1.0, 0.5, 0), (2, 128, 1.0, 0.5, 1),
    (2, 128, 2.0, 0.5, 0), (2, 128, 2.0, 0.5, 1),
    (2, 128, 4.0, 0.5, 0), (2, 128, 4.0, 0.5, 1),
    # student size at T=2
    (1, 64, 2.0, 0.5, 0), (1, 128, 2.0, 0.5, 0), (2, 64, 2.0, 0.5, 0), (4, 128, 2.0, 0.5, 0),
    # loss weight at 2x128, T=2
    (2, 128, 2.0, 0.0, 0), (2, 128, 2.0, 0.9, 0),
]
FAILED = (4, 64, 8.0, 0.5, 0)
TEACHER = {"n_layer": 4, "n_embd": 256}


def params_of(n_layer: int, n_embd: int) -> tuple[int, int]:
    """(params, params_non_embedding) of a GPT-2-shaped model with a tied head."""
    non_emb = 12 * n_layer * n_embd * n_embd + 13 * n_layer * n_embd + 2 * n_embd
    return non_emb + (VOCAB + 128) * n_embd, non_emb


def final_metrics(n_layer: int, n_embd: int, temperature: float, kd_weight: float,
                  seed: int) -> dict[str, float]:
    """Deterministic final metrics: bigger is better, T=2 is best, seeds jitter a little."""
    params, non_emb = params_of(n_layer, n_embd)
    capacity = 0.06 * n_layer + 0.0008 * n_embd
    temp_term = -0.03 * (temperature - 2.0) ** 2
    kd_term = 0.06 * kd_weight - 0.05 * kd_weight ** 2
    jitter = 0.004 * (1 if seed % 2 else -1)
    base = 0.25 + capacity + temp_term + kd_term + jitter
    m = {
        "acc_completion": base + 0.05,
        "acc_choice": base + 0.20,
        "em_qa": base - 0.10,
        "f1_qa": base - 0.02,
    }
    m["acc_mean"] = sum(m.values()) / 4
    m.update(
        params=float(params),
        params_non_embedding=float(non_emb),
        size_mb=params * 4 / 1e6,
        flops_per_token=2.0 * params,
        latency_ms_per_token=0.8 + 0.35 * n_layer + 0.002 * n_embd,
        val_loss=3.0 - 2.0 * capacity,
        val_ppl=0.0,
        tokens_per_s=40000.0 / (n_layer * n_embd / 128),
    )
    m["val_ppl"] = 2.718281828 ** m["val_loss"]
    return m


def teacher_metrics() -> dict[str, float]:
    m = final_metrics(TEACHER["n_layer"], TEACHER["n_embd"], 2.0, 0.5, 0)
    # the teacher is trained longer: a little more accurate than its size alone gives
    m = {k: v + 0.05 if k.startswith(("acc_", "em_", "f1_")) else v for k, v in m.items()}
    return {f"teacher_{k}": v for k, v in m.items() if k != "tokens_per_s"}


def trial_params(n_layer: int, n_embd: int, temperature: float, kd_weight: float,
                 seed: int) -> dict[str, object]:
    return {
        "loss.temperature": temperature, "loss.kd_weight": kd_weight,
        "loss.divergence": "forward_kl", "student.n_layer": n_layer,
        "student.n_embd": n_embd, "student.top_k": 0, "train.seed": seed,
        "train.steps": STEPS[-1], "train.lr": 0.002, "data.world_size": "tiny",
        "train.device": "cpu", "teacher.trust_remote_code": False,
    }


@dataclass
class Store:
    """What a test needs to find the runs again."""

    root: Path
    tracking_uri: str
    experiment: str = EXPERIMENT
    experiment_id: str = ""
    parent_run_id: str = ""
    old_parent_run_id: str = ""
    child_run_ids: list[str] = field(default_factory=list)
    failed_run_id: str = ""


def _log_child(mlflow, client, parent_id: str, trial_id: str, trial: tuple, fail: bool) -> str:
    with mlflow.start_run(run_name=f"trial_{trial_id}", nested=True,
                          tags={"mlflow.parentRunId": parent_id, "kd.role": "trial",
                                "kd.trial_id": trial_id}) as run:
        mlflow.log_params(trial_params(*trial))
        final = final_metrics(*trial)
        for i, step in enumerate(STEPS):
            if fail and i == 2:
                mlflow.set_tag("kd.error", "non-finite loss (nan) at step 250")
                break
            frac = (i + 1) / len(STEPS)
            mlflow.log_metrics({"val_loss": final["val_loss"] + 1.5 * (1 - frac) ** 2,
                                "train_loss": final["val_loss"] + 1.2 * (1 - frac)},
                               step=step)
        if not fail:
            final["retention"] = final["acc_mean"] / teacher_metrics()["teacher_acc_mean"]
            mlflow.log_metrics(final, step=STEPS[-1])
    if fail:
        client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def build_store(root: Path) -> Store:
    """Create (once) and return the fixture store under ``root``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    store = Store(root=root, tracking_uri=uri)
    done = root / "DONE"
    client = MlflowClient(uri)
    if done.exists():
        ids = done.read_text().split()
        exp = client.get_experiment_by_name(EXPERIMENT)
        store.experiment_id = exp.experiment_id
        store.old_parent_run_id, store.parent_run_id, store.failed_run_id = ids[:3]
        store.child_run_ids = ids[3:]
        return store

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = client.create_experiment(EXPERIMENT,
                                          artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp_id)
        store.experiment_id = exp_id
        sweep_tags = {"kd.role": "sweep", "kd.sweep": EXPERIMENT}
        objectives = "acc_mean:max,params:min,latency_ms_per_token:min"
        # An older sweep in the same experiment: load_runs must not mix it in.
        with mlflow.start_run(run_name="pareto-old", tags=sweep_tags) as old:
            mlflow.log_params({"objectives": objectives, "num_samples": 1})
            mlflow.log_metrics(teacher_metrics())
            _log_child(mlflow, client, old.info.run_id, "old_0", (1, 64, 1.0, 0.5, 0), False)
        store.old_parent_run_id = old.info.run_id
        with mlflow.start_run(run_name="pareto", tags=sweep_tags) as parent:
            mlflow.log_params({"objectives": objectives, "num_samples": len(TRIALS) + 1,
                               "teacher.n_layer": TEACHER["n_layer"],
                               "teacher.n_embd": TEACHER["n_embd"]})
            mlflow.log_metrics(teacher_metrics())
            for i, trial in enumerate(TRIALS):
                store.child_run_ids.append(
                    _log_child(mlflow, client, parent.info.run_id, f"t{i:03d}", trial, False))
            store.failed_run_id = _log_child(mlflow, client, parent.info.run_id, "t999",
                                             FAILED, True)
        store.parent_run_id = parent.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    done.write_text(" ".join([store.old_parent_run_id, store.parent_run_id,
                              store.failed_run_id, *store.child_run_ids]))
    return store


def image_stats(path: Path) -> tuple[int, float]:
    """(distinct colours, share of the most common colour) of an image file."""
    from PIL import Image

    with Image.open(path) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 24)
    total = sum(n for n, _ in colors)
    return len(colors), max(n for n, _ in colors) / total


def assert_not_blank(path: Path, min_colors: int = 16, max_share: float = 0.98) -> None:
    """A real picture: many colours, and not one colour nearly everywhere."""
    n_colors, share = image_stats(path)
    assert n_colors >= min_colors and share <= max_share, (
        f"{path} looks blank: {n_colors} colours, the commonest covers {share:.1%}")
