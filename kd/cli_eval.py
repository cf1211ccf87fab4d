"""``kd eval``: evaluate a saved model on the world's sets, a public benchmark file, or lm-eval tasks.

    kd eval --model runs/distill/student --task world --data ~/.cache/kd/worlds/<fp>
    kd eval --model DIR --task lambada --data lambada_test.jsonl --limit 500 --out lambada.json
    kd eval --model DIR --harness lambada_openai,hellaswag --limit 100     # needs the eval extra

Prints a table and writes every figure to a JSON file, with the sha256 of each data file
it read (and, with ``--predictions``, what the model answered for every item). ``kd.cli``
registers the subcommand through :func:`add_parser`; ``python -m kd.cli_eval ...`` runs it
alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.cache import sha256_file
from kd.config import ConfigError
from kd.hub import offline as hub_offline  # HF_*_OFFLINE as set, or as kd.hub set it

TASKS = ("world", "lambada", "hellaswag", "storycloze", "nq_open", "webquestions", "triviaqa")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on a ``kd`` subparsers object; it runs :func:`run`."""
    p = subparsers.add_parser("eval", help="evaluate a model: the world's sets, a benchmark file, or lm-eval tasks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained directory (or hub id) with its tokenizer")
    p.add_argument("--task", choices=TASKS, help="world (--data is a world directory) or a public benchmark")
    p.add_argument("--data", help="the task's file (.jsonl/.json/.csv), a hub dataset id, or a world directory")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (of each set) "
                   "(default: all items)")
    p.add_argument("--out", help="JSON file to write (default: eval_<task>.json in the current directory)")
    p.add_argument("--fewshot", help="QA examples for the few-shot prompt, in the task's format (first 5 used) "
                   "(default: none: zero-shot; --task world always uses the world's qa_fewshot.jsonl)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument("--harness", metavar="TASKS", help="comma-separated lm-eval task names to run (eval extra)")
    p.add_argument("--include-path", metavar="DIR", help="directory of custom lm-eval task YAMLs")
    p.add_argument("--predictions", action="store_true", help="also write every item's output (prediction, "
                   "log-likelihoods, score) to the JSON file")
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.task and not args.harness:
        raise ConfigError("--task and --harness are both missing: give a task (e.g. --task lambada --data FILE) "
                          "or lm-eval tasks (--harness lambada_openai)")
    if args.task and not args.data:
        raise ConfigError(f"--task={args.task!r} needs --data: a world directory for 'world', else the task's file "
                          "or a hub dataset id")
    if args.task == "world":
        missing = [n for n in ("completion.jsonl", "choice.jsonl", "qa.jsonl") if not (Path(args.data) / n).is_file()]
        if missing:
            raise ConfigError(f"--data={args.data!r} is not allowed for --task world: it must be a world directory "
                              f"(print one with `kd world`); missing {', '.join(missing)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit} is not allowed: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} is not allowed: must be >= 1")
    if args.task and args.task != "world":
        from kd.eval_loaders import _looks_like_path

        data = Path(args.data).expanduser()
        if (data.is_dir() or _looks_like_path(args.data)) and not data.is_file():
            raise ConfigError(f"--data={args.data!r} is not allowed: no such file (a .jsonl, .json or .csv file, "
                              "or a hub dataset id)")
    if args.fewshot and not Path(args.fewshot).expanduser().is_file():
        raise ConfigError(f"--fewshot={args.fewshot!r} is not allowed: no such file")
    if args.out:
        _check_out(args.out)
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path={args.include_path!r} is not allowed: the directory does not exist")
    _check_model(args.model)
    if _needs_hub(args):
        from kd.hub import offline_unless_reachable

        # Before lm-eval, datasets and transformers look anything up: with no network and no
        # HF_*_OFFLINE they retry the hub for half a minute, then print a long traceback.
        offline_unless_reachable()
    if args.harness:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("--harness needs lm-evaluation-harness, which is not installed: "
                              "install the eval extra with `pip install -e .[eval]`") from None
        check_harness_data_offline([t.strip() for t in args.harness.split(",") if t.strip()], args.include_path)


def _check_model(model: str) -> None:
    """``--model`` that is clearly a path must be a folder (transformers would call it a
    malformed repo id); any other name is left to be a local folder or a hub id."""
    from kd.hub import not_a_folder

    why = not_a_folder(model)
    if why is not None:
        raise ConfigError(f"--model={model!r} could not be loaded: {why}; give a save_pretrained directory "
                          "(with its tokenizer) or a hub id such as gpt2")


def _needs_hub(args: argparse.Namespace) -> bool:
    """Whether this evaluation may look anything up on the hub: lm-eval tasks, a model or a
    data set that is not a local path."""
    local_data = args.task in (None, "world") or Path(args.data).expanduser().exists()
    return bool(args.harness) or not Path(args.model).expanduser().exists() or not local_data


def _check_out(out: str) -> None:
    """``--out`` must be a file that can be written: found now, not after the evaluation."""
    from kd.preflight import check_output_dir

    p = Path(out).expanduser()
    if p.is_dir():
        raise ConfigError(f"--out={out!r} is not allowed: it is a directory; give a .json file path")
    check_output_dir(p.parent, key="--out")


def _device(name: str) -> str:
    from kd.device import pick_device

    try:
        return str(pick_device(name, key="--device"))
    except RuntimeError as e:
        raise ConfigError(f"{e} (use cpu or auto)") from None


def data_hashes(task: str | None, data: str | None, fewshot: str | None = None) -> dict[str, str]:
    """``{file: sha256}`` of every local file an evaluation reads (a hub id has none: its
    revision is the hub's business)."""
    files: list[Path] = []
    if task == "world" and data:
        files += [Path(data) / n for n in ("completion.jsonl", "choice.jsonl", "qa.jsonl", "qa_fewshot.jsonl")]
    elif data:
        files.append(Path(data).expanduser())
    if fewshot:
        files.append(Path(fewshot).expanduser())
    return {str(f): sha256_file(f) for f in files if f.is_file()}


def evaluate_task(model: Any, tokenizer: Any, task: str, data: str, *, limit: int | None = None,
                  fewshot: str | None = None, batch_size: int = 32,
                  records: dict[str, list[dict]] | None = None) -> dict[str, float]:
    """Figures for one task: the world's five, or the family's (acc/loglik, acc/acc_norm, em/f1).

    ``records``, when given, gets the per-item outputs under the task's name (the world's
    three sets under ``completion``, ``choice`` and ``qa``).
    """
    from kd import evaluate as ev
    from kd.eval_loaders import TASKS as LOADERS, load_task

    if task == "world":
        if records is None:
            return ev.evaluate_world(model, tokenizer, data, limit=limit, batch_size=batch_size)
        return _world_with_records(model, tokenizer, data, limit, batch_size, records)
    try:  # a missing file or a malformed row: one line for the user, not a traceback
        items = load_task(task, data, limit=limit)
        shots = load_task(task, fewshot, limit=5) if fewshot else []
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    family = LOADERS[task][0]
    out = None if records is None else records.setdefault(task, [])
    if family == "completion":
        return ev.eval_completion(model, tokenizer, items, batch_size=batch_size, records=out)
    if family == "choice":
        return ev.eval_choice(model, tokenizer, items, batch_size=batch_size, records=out)
    return ev.eval_qa(model, tokenizer, items, fewshot=shots, batch_size=batch_size, records=out)


def _world_with_records(model: Any, tokenizer: Any, data: str, limit: int | None, batch_size: int,
                        records: dict[str, list[dict]]) -> dict[str, float]:
    """:func:`kd.evaluate.evaluate_world`'s figures, keeping each item's output."""
    from kd import evaluate as ev

    d = Path(data)
    fewshot = ev.read_jsonl(d / "qa_fewshot.jsonl") if (d / "qa_fewshot.jsonl").is_file() else []
    comp = ev.eval_completion(model, tokenizer, ev.read_jsonl(d / "completion.jsonl", limit), batch_size=batch_size,
                              records=records.setdefault("completion", []))
    choice = ev.eval_choice(model, tokenizer, ev.read_jsonl(d / "choice.jsonl", limit), batch_size=batch_size,
                            records=records.setdefault("choice", []))
    qa = ev.eval_qa(model, tokenizer, ev.read_jsonl(d / "qa.jsonl", limit), fewshot=fewshot, batch_size=batch_size,
                    records=records.setdefault("qa", []))
    out = {"acc_completion": comp["acc"], "acc_choice": choice["acc"], "em_qa": qa["em"], "f1_qa": qa["f1"]}
    out["acc_mean"] = sum(out.values()) / 4
    return out


_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _offline_hint(task: str, dataset: str) -> str:
    return (f"--harness task {task!r} cannot run offline: its data ({dataset}) is not in the local datasets cache; "
            "run it once with a network, or copy its task YAML into a directory with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: /absolute/path/to/file.jsonl}}` and pass --include-path DIR")


def check_harness_data_offline(names: list[str], include_path: str | None = None) -> None:
    """Offline, refuse at once a task whose hub data set is not cached (before lm-eval indexes
    its ~15k tasks, which takes 20-45 s). A task whose YAML is not found, or whose data is
    local files, is left to lm-eval."""
    if not hub_offline():
        return
    import datasets
    import lm_eval

    roots = [Path(include_path)] if include_path else []
    roots.append(Path(lm_eval.__file__).parent / "tasks")
    wanted = {n: re.compile(rf"^task:\s*['\"]?{re.escape(n)}['\"]?\s*$", re.M) for n in names}
    found: dict[str, str] = {}
    for root in roots:
        for path in root.rglob("*.yaml"):
            if len(found) == len(wanted):
                break
            text = None
            for name, pattern in wanted.items():
                if name in found:
                    continue
                text = text if text is not None else path.read_text(errors="replace")
                if pattern.search(text):
                    found[name] = text
    for name, text in found.items():
        path_m = re.search(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", text, re.M)
        if not path_m or path_m.group(1) in _LOCAL_BUILDERS:
            continue
        config_m = re.search(r"^dataset_name:\s*['\"]?([^'\"\s#]+)", text, re.M)
        dataset = path_m.group(1)
        try:
            datasets.load_dataset_builder(dataset, config_m.group(1) if config_m else None)
        except Exception:  # offline and not cached: every way it fails says the same to the user
            raise ConfigError(_offline_hint(name, dataset)) from None


def run_harness(model: Any, tokenizer: Any, tasks: str, *, limit: int | None = None,
                include_path: str | None = None, batch_size: int = 32, device: str = "cpu") -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the in-memory model; returns its ``results`` section."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # logits_cache=False: lm-eval 0.4.13's cache mis-scores a request whose whole token
    # sequence equals another's in the batch but is split elsewhere (tests/test_lm_eval_parity.py)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, logits_cache=False)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = None
    if include_path:  # indexing lm-eval's ~15k built-in tasks takes 20-45 s: skip it when all are custom
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in names):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--harness task(s) {', '.join(unknown)} not known to lm-eval"
                          + (f" or in --include-path={include_path!r}" if include_path else
                             " (custom task YAMLs go in a directory given with --include-path)"))
    try:
        out = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, bootstrap_iters=0)
    except Exception as e:  # offline, a task's data missing: one line rather than lm-eval's traceback
        if not hub_offline():
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--harness {tasks!r} failed offline ({first}); a task's data may not be available "
                          "offline: run once with a network, or point lm-eval at local files with a task YAML "
                          "(`dataset_path: json`, `dataset_kwargs: {data_files: {test: /abs/file.jsonl}}`) "
                          "in a directory given with --include-path") from None
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, res in out["results"].items()}


def _table(rows: list[tuple[str, str, Any]]) -> str:
    width = [max(len(str(r[i])) for r in rows) for i in range(2)]
    lines = []
    for a, b, v in rows:
        val = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{a:<{width[0]}}  {b:<{width[1]}}  {val}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``kd eval``: check arguments, load the model, evaluate, print a table, write JSON."""
    _check_args(args)
    device = _device(args.device)
    from kd.models import load_pretrained

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(args.model)
    except (OSError, ValueError) as e:  # missing, offline, or not a model directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--model={args.model!r} could not be loaded: {first}") from None
    model.to(device).eval()
    report: dict[str, Any] = {"model": args.model, "task": args.task, "data": args.data, "limit": args.limit,
                              "data_sha256": data_hashes(args.task, args.data, args.fewshot)}
    rows: list[tuple[str, str, Any]] = [("task", "metric", "value")]
    if args.task:
        records: dict[str, list[dict]] | None = {} if args.predictions else None
        metrics = evaluate_task(model, tokenizer, args.task, args.data, limit=args.limit, fewshot=args.fewshot,
                                batch_size=args.batch_size, records=records)
        report["metrics"] = metrics
        if records is not None:
            report["predictions"] = records
        rows += [(args.task, k, v) for k, v in metrics.items()]
    if args.harness:
        harness = run_harness(model, tokenizer, args.harness, limit=args.limit, include_path=args.include_path,
                              batch_size=args.batch_size, device=device)
        report["harness"] = harness
        rows += [(f"lm-eval:{t}", k, v) for t, res in harness.items() for k, v in res.items()]
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out or f"eval_{args.task or 'harness'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(rows))
    print(f"written: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kd.cli_eval ...``: the same subcommand without the rest of ``kd``."""
    parser = argparse.ArgumentParser(prog="kd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"kd eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
