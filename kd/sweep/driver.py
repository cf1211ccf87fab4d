"""Run a sweep on Ray: the search, the finalists, the latency pass; every trial in MLflow.

:func:`run_sweep` takes a :class:`~kd.sweep.spec.SweepSpec`, a validated base
:class:`~kd.config.KDConfig` and :class:`~kd.sweep.spec.SweepOptions`, and runs three
phases, each recorded in ``sweep.json`` so an interrupted sweep resumes in the phase it
stopped (``Tuner.restore(..., resume_unfinished=True)``):

1. search: Tune + Optuna over the space (:mod:`kd.sweep.search`), ASHA on a metric that
   ranks like the objective for single-objective sweeps;
2. finalists (:mod:`kd.sweep.finalists`): the CE-only reference and the best configuration
   (or the front) re-run with more seeds, as child runs tagged ``kd.role``;
3. latency (:mod:`kd.sweep.latency`): one timing per distinct student shape, in one
   process with fixed threads and interleaved repeats, logged on every run of that shape.

MLflow runs are written from this driver by :class:`~kd.sweep.mlflow.MLflowTrials`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Accuracy arrives only in rung and final results; the other evaluations carry val_loss.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402

from kd import reaper  # noqa: E402
from kd.config import KDConfig, apply_overrides  # noqa: E402
from kd.sweep import finalists, trial  # noqa: E402
from kd.sweep.mlflow import MLflowTrials  # noqa: E402
from kd.sweep.results import SweepResults, summarize  # noqa: E402
from kd.sweep.search import pruning, searcher, to_tune  # noqa: E402
from kd.sweep.spec import (META, SweepError, SweepOptions, SweepSpec, base_dict, check_cache_serves,  # noqa: E402
                           check_objectives, check_space, corner_configs, space_to_json)
from kd.sweep.util import dump_json, preflight  # noqa: E402

#: The watcher of the local Ray session this process started (None: none started, or a cluster).
_reaper = None


def _ray_init(address: str | None) -> None:
    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if address:  # a cluster: "auto" on the head, or ray://..., or an explicit GCS address
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:  # never a bare ray.init(): it may attach to another Ray on this machine
        temp = os.environ.get("KD_RAY_TEMP_DIR")
        _loopback_only()
        ctx = ray.init(address="local", include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": env}, **({"_temp_dir": temp} if temp else {}))
        # Ray's agents outlive a SIGKILLed driver by a minute: a watcher ends them (kd.reaper).
        global _reaper
        _reaper = reaper.watch_ray_session(ctx.address_info["session_dir"])


def _ray_shutdown() -> None:
    """Stop the local Ray this process started, then release its watcher."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        reaper.release(_reaper)
        _reaper = None


def _loopback_only() -> None:
    """Make the local Ray about to start listen on 127.0.0.1 only.

    A one-machine sweep needs no other host, yet Ray's servers (GCS, raylet, workers,
    agents) listen on every interface by default, and ``ray.init(_node_ip_address=
    "127.0.0.1")`` is turned back into the routable address. Ray's single-machine mode
    (what it uses on macOS and Windows) takes the loopback as the node address, and then
    every server binds it: the environment variable reaches the processes Ray starts, the
    constant this process (read when the node starts, after ``import ray``). The slow test
    ``tests/test_ray_local.py`` checks the listening sockets, so a Ray that changes this fails loudly.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


#: CPU-only machines run trials of ``cpus // CPU_THREAD_SHARE`` threads (at least 1, at most 8), so as many
#: trials at once as fit: 2 of 1 thread on 2 cores, 4 of 4 on 16 (the 2-core ratio above
#: is what was measured; larger machines follow the same rule untested).
CPU_THREAD_SHARE = 4


def _resources(num_workers: int, use_gpu: bool, force_train: bool = False) -> tuple[dict[str, float], int, int]:
    """(trial resources, threads per worker, trials that fit at once) from the cluster's size."""
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 1)), int(total.get("GPU", 0))
    if force_train and num_workers == 1 and not use_gpu:  # one Train worker with the trial's threads
        threads = cpus if cpus <= 8 else 8
        return {"cpu": 0, "memory": 64 << 20}, threads, max(1, cpus // threads)
    if num_workers == 1 and not force_train:
        # The loop runs in the trial: it holds a GPU, or a share of a CPU-only machine's
        # cores. Measured on 2 cores (the demo student, compiled step): two trials of one
        # thread each trained 1.35x the total tokens/s of one trial of two threads (1.36x
        # eager), since a small model's kernels do not scale across threads. Each trial
        # holds its threads' CPUs, so they never oversubscribe the cores (oversubscribed,
        # two 2-thread processes on 2 cores ran ~10x slower each, measured).
        if use_gpu:
            threads = max(1, min(8, cpus // max(gpus, 1)))
            return {"cpu": threads, "gpu": 1}, threads, max(1, gpus)
        threads = max(1, min(8, cpus // CPU_THREAD_SHARE))
        return {"cpu": threads}, threads, max(1, cpus // threads)
    # The Tune trial only drives a TorchTrainer whose workers hold the resources;
    # {"cpu": 0} alone raises "empty head bundle" (Ray 2.60).
    threads = 1 if not use_gpu else max(1, cpus // max(gpus, 1))
    per_trial = gpus // num_workers if use_gpu else cpus // (num_workers * threads)
    return {"cpu": 0, "memory": 64 << 20}, threads, max(1, per_trial)


def _prepare(base: KDConfig, num_workers: int = 1, configs: list[KDConfig] = ()) -> None:
    """Check the batch sizes against the data and the trials' temperatures against the
    soft-label cache, then build the world and train the teacher once, here, before Ray
    starts or any trial needs them (a batch larger than the data would otherwise fail
    every trial, one by one)."""
    from kd.preflight import check_training
    from kd.teacher import ensure_teacher

    tokenizer = check_training(base, world_size=num_workers)
    check_cache_serves([base, *configs], len(tokenizer))
    ensure_teacher(base, progress=True)


def _prepare_soft_labels(base: KDConfig) -> dict[str, float]:
    """The teacher's reference metrics and, in cache mode, its soft labels, before the trials.

    On a cluster (several nodes, or GPUs) the teacher pass runs as Ray Data batch
    inference over them; on one CPU node it runs as a loop in this process, which measured
    4.3x faster than Ray Data's actor pool on the same node (5.7 s against 24.3 s for the
    demo's 534 blocks: the pool's start-up and object transfers cost more than they spread).
    The trials then only read the cache and never load the teacher. A trial whose config
    needs another cache (a searched ``teacher.top_k``) builds its own.
    """
    from kd.data import load_blocks
    from kd.models import load_pretrained, load_tokenizer
    from kd.run import teacher_metrics
    from kd.teacher import ensure_teacher

    source = ensure_teacher(base)
    trust = base.teacher.trust_remote_code
    tokenizer = load_tokenizer(source, trust_remote_code=trust)
    blocks = load_blocks(base.data, tokenizer)
    if base.teacher.mode == "cache":
        from kd.soft_labels import ensure_soft_labels

        # The Ray Data actors load their own teacher; this process loads it only when the
        # reference metrics are not cached yet.
        spread = len(ray.nodes()) > 1 or ray.cluster_resources().get("GPU", 0) > 0
        ensure_soft_labels(base, source, tokenizer, blocks.train, backend="ray" if spread else "local",
                           progress=True)
    return teacher_metrics(None, tokenizer, source, base, blocks.val,
                           load=lambda: load_pretrained(source, trust_remote_code=trust)[0])


def _state(spec: SweepSpec, base: KDConfig, options: SweepOptions, parent_id: str, uri: str,
           experiment: str) -> dict[str, Any]:
    """What ``sweep.json`` records: everything a resume needs to be this sweep again."""
    space, points = spec.for_preset(options.preset)
    return {"name": spec.name, "experiment": experiment, "parent_run_id": parent_id, "tracking_uri": uri,
            "preset": options.preset, "budget": options.budget, "overrides": options.overrides,
            "objectives": spec.objectives, "space": space_to_json(space), "points": points,
            "base": base_dict(base), "repeats": options.repeats, "references": options.references,
            "early_stop": options.early_stop, "num_workers": options.num_workers, "seed": options.seed,
            "phase": "search"}


def run_sweep(spec: SweepSpec, base: KDConfig, options: SweepOptions) -> SweepResults:
    """Run (or resume) a sweep and record every trial in MLflow.

    Args:
        spec: the declaration; ``spec.for_preset(options.preset)`` gives space and points.
        base: the validated config every trial starts from (preset, fixed, ``--set``).
        options: budget, workers, resume, repeats, ... (see :class:`SweepOptions`).
    """
    from kd.tracking import Tracker, tracking_uri

    started = time.time()
    out = Path(options.output_dir).expanduser().resolve()
    space, points = spec.for_preset(options.preset)
    check_space(space, base)
    check_objectives(spec.objectives)
    uri = tracking_uri(out, create=False)  # the folder is made once the sweep can start
    preflight(bool(options.use_gpu), options.address)  # seconds, not minutes of retries (kd.sweep.cli ran it too)
    experiment = options.experiment or spec.name
    state_file = out / "sweep.json"
    state = json.loads(state_file.read_text()) if options.resume else {}

    prune = pruning(spec.objectives, base.train.steps, base.train.eval_every) if options.early_stop else None
    if options.prepare:
        _prepare(base, options.num_workers, corner_configs(space, points, base))
    if options.address and base.teacher.mode == "cache" and not base.teacher.soft_labels_dir:
        # A cluster's nodes do not share ~/.cache: keep the soft labels beside the sweep's
        # results, which every node reads (cluster.yaml mounts shared storage there).
        base = apply_overrides(base, {"teacher.soft_labels_dir": str(out / "soft_labels")})
    storage = out / "ray_results"
    _ray_init(options.address)
    tracker = parent_id = None
    try:
        teacher = _prepare_soft_labels(base) if options.prepare else {}
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = options.use_gpu if options.use_gpu is not None else gpus > 0
        if use_gpu and not gpus and not options.address:  # a local Ray never grows a GPU
            raise SweepError("--gpu is not possible here: this machine's Ray has no GPU "
                             f"(resources {dict(ray.cluster_resources())}); drop --gpu")
        resources, threads, fits = _resources(options.num_workers, use_gpu, options.force_train)
        # Only now is anything durable written: a sweep that could not start leaves no
        # sweep.json (a rerun is not refused, a bare --resume does not pick this folder).
        out.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(uri, experiment)
        if options.resume:
            parent_id = tracker.start_sweep(spec.name, {}, run_id=state["parent_run_id"])
        else:
            params = {**{f"fixed.{k}": v for k, v in base_dict(base).items()},
                      "objectives": ",".join(spec.objectives), "budget": options.budget,
                      "num_workers": options.num_workers, "preset": options.preset, "repeats": options.repeats,
                      "space": "; ".join(f"{k}={v}" for k, v in space.items())}
            parent_id = tracker.start_sweep(spec.name, params)
            state = _state(spec, base, options, parent_id, uri, experiment)
            dump_json(state_file, state)
        results = SweepResults(spec.name, experiment, out, uri, parent_id, spec.objectives)
        meta = {"trials_dir": str(out / "trials"), "threads": threads, "num_workers": options.num_workers,
                "use_gpu": use_gpu, "max_failures": options.max_failures, "storage_path": str(storage),
                "base": base_dict(base), "searched": sorted(space), "prune": prune.meta() if prune else None,
                # The latency pass measures every shape after the trials; a trial measures its
                # own only when the search itself needs it (a latency objective).
                "trial_latency": "latency_ms_per_token" in spec.objectives}
        in_trial = options.num_workers == 1 and not options.force_train
        fn = trial.trial_in_process if in_trial else trial.trial_torch_trainer
        if options.runner is not None:  # a benchmark's stand-in loop, shipped to the trials by Ray
            fn = tune.with_parameters(fn, runner=options.runner)
        trainable = tune.with_resources(fn, resources)
        callback = MLflowTrials(uri, experiment, parent_id, spec.name, prune.metric if prune else None)
        concurrency = options.max_concurrent or fits
        reuse = in_trial

        def fit(name: str, build) -> tuple[Any, bool]:
            """Run (or restore and finish) one Tune experiment; (grid, whether it completed)."""
            path = storage / name
            if tune.Tuner.can_restore(str(path)):
                tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                           resume_errored=False)
            else:
                tuner = build()
            grid = tuner.fit()
            return grid, grid.num_terminated + grid.num_errors >= state.get(f"n_{name}", 0)

        def search_tuner() -> tune.Tuner:
            return _tuner(trainable, spec.name, storage, callback, concurrency, reuse,
                          param_space={**to_tune(space), META: meta},
                          search_alg=searcher(spec.objectives, space, seed=options.seed, budget=options.budget,
                                              points=points),
                          scheduler=prune.scheduler(base.train.steps) if prune else None,
                          num_samples=options.budget)

        state[f"n_{spec.name}"] = options.budget
        _stop_if_interrupted(options, "the search")
        grid, complete = fit(spec.name, search_tuner)
        results.trials = finalists.collect(grid, tracker, parent_id, role="trial")
        if not complete:
            return _interrupted(results, tracker, started)
        if not any(t["status"] == "FINISHED" for t in results.trials):
            reasons = [t["error"] for t in results.trials if t["error"]]
            results.error = (f"no trial of {len(results.trials)} finished; the first failed with: "
                             f"{reasons[0] if reasons else 'no reason recorded'}")
            return _ended(results, tracker, started, "FAILED")
        finalists.mark_references(results.trials, tracker)
        name2 = f"{spec.name}-finalists"
        variants = state.get("variants")
        if variants is None:  # chosen once, from the search's records, and kept for a resume
            variants = finalists.variants(results.trials, spec.objectives, base, repeats=options.repeats,
                                          references=options.references, anchor=(points or [None])[0])
            state.update(variants=variants, phase="finalists", **{f"n_{name2}": len(variants)})
            dump_json(state_file, state)
        if variants:
            _stop_if_interrupted(options, "the finalists")
            grid2, complete = fit(name2, lambda: _tuner(
                trainable, name2, storage, callback, concurrency, reuse,
                param_space={META: meta, finalists.VARIANT: tune.grid_search(variants)}, num_samples=1))
            results.trials += finalists.collect(grid2, tracker, parent_id, role=None)
            if not complete:
                return _interrupted(results, tracker, started)
    except BaseException as e:
        if tracker is not None and parent_id is not None:
            if isinstance(e, KeyboardInterrupt):  # as after Tune's own Ctrl-C: resumable
                tracker.end_sweep(parent_id, "KILLED")
            else:
                tracker.client.set_tag(parent_id, "kd.error", f"{type(e).__name__}: {e}"[:5000])
                tracker.end_sweep(parent_id, "FAILED")
        raise
    finally:
        if not options.address:
            _ray_shutdown()

    from kd.sweep import latency

    timed = latency.pass_(results.trials, tracker, base, out / "trials")
    teacher = dict(teacher or tracker.teacher_metrics(parent_id))
    if timed:
        teacher["latency_ms_per_token"] = timed["teacher"]["median"]
        tracker.log_metrics(parent_id, {"teacher_latency_ms_per_token": timed["teacher"]["median"],
                                        "teacher_latency_ms_per_token_std": timed["teacher"]["std"]})
    results.summary = summarize(results.trials, spec.objectives, teacher)
    tracker.log_summary(parent_id, results.summary)
    state["phase"] = "done"
    dump_json(state_file, state)
    results.wall_time_s = time.time() - started
    tracker.end_sweep(parent_id, "FINISHED")
    _write_results(results)
    return results


def _stop_if_interrupted(options: SweepOptions, phase: str) -> None:
    """Raise the Ctrl-C that Python lost (``options.interrupted``) before ``phase`` starts."""
    if options.interrupted is not None and options.interrupted():
        raise KeyboardInterrupt(f"before {phase} started")


def _interrupted(results: SweepResults, tracker, started: float) -> SweepResults:
    results.interrupted = True
    return _ended(results, tracker, started, "KILLED")


def _ended(results: SweepResults, tracker, started: float, status: str) -> SweepResults:
    results.wall_time_s = time.time() - started
    if results.error:
        tracker.client.set_tag(results.parent_run_id, "kd.error", results.error[:5000])
    tracker.end_sweep(results.parent_run_id, status)
    _write_results(results)
    return results


def _write_results(results: SweepResults) -> None:
    dump_json(results.output_dir / "results.json", {
        "sweep": results.name, "experiment": results.experiment, "tracking_uri": results.tracking_uri,
        "parent_run_id": results.parent_run_id, "wall_time_s": results.wall_time_s,
        "interrupted": results.interrupted, "error": results.error, "objectives": results.objectives,
        **results.summary, "trials": results.trials})


def _tuner(trainable, name: str, storage: Path, callback, concurrency: int, reuse: bool, *, param_space: dict,
           search_alg=None, scheduler=None, num_samples: int) -> tune.Tuner:
    from ray.tune import CheckpointConfig, RunConfig

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrency, reuse_actors=reuse),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=[callback],
                             checkpoint_config=CheckpointConfig(num_to_keep=2), verbose=1),
    )
