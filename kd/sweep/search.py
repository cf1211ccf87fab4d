"""What proposes and what stops trials: Tune domains, the Optuna searcher, ASHA's rungs.

- :func:`searcher`: TPE for one objective; TPE's multi-objective mode (``metric`` and
  ``mode`` as lists) for several. It never proposes a point within 2% of one already
  proposed on every searched dimension (in log space for log dimensions): TPE likes to
  sample next to its best point, and on a budget of 8 trials T=0.5390 after T=0.5398 is
  a wasted trial.
- :func:`pruning`: ASHA only for one objective (Optuna does not prune multi-objective
  studies), and only on a metric that ranks trials like the objective: the objective
  itself, scored at the rungs (a task metric is evaluated there: see
  :mod:`kd.sweep.trial`). Never on raw validation loss for an accuracy objective: it
  follows model size and favours kd_weight near 0, exactly what the size and kd_weight
  sweeps compare. Rungs are evaluation steps strictly before the last one, so a trial that
  trains to ``train.steps`` is never stopped and always evaluated.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket  # private in Ray 2.60 (pinned); see NoiseAwareASHA
from ray.tune.search.optuna import OptunaSearch

from kd.metrics import TASK_METRICS, direction
from kd.sweep.spec import Choice, IntRange, LogUniform, Space, Uniform, check_objectives, is_close
from kd.sweep.trial import RUNG_STEP

log = logging.getLogger(__name__)


def to_tune(space: Space) -> dict[str, Any]:
    """kd's search dimensions as Tune domains (flat, dotted keys)."""
    out: dict[str, Any] = {}
    for key, dim in space.items():
        if isinstance(dim, LogUniform):
            out[key] = tune.loguniform(dim.low, dim.high)
        elif isinstance(dim, Uniform):
            out[key] = tune.uniform(dim.low, dim.high)
        elif isinstance(dim, IntRange):
            out[key] = tune.randint(dim.low, dim.high + 1)  # Tune's upper bound is exclusive
        elif isinstance(dim, Choice):
            out[key] = tune.choice(list(dim.values))
        else:
            raise TypeError(f"search space {key}: unknown dimension {dim!r}")
    return out


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that tolerates results without the objective and skips near-duplicates.

    Trials report ``val_loss`` at every evaluation but task accuracy only at rungs and at
    the end; the stock searcher indexes ``result[metric]`` on every result and would raise.
    """

    def __init__(self, *args: Any, kd_space: Space, n_points: int, seed: int = 0, retries: int = 10,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kd_space, self.n_points, self.retries = kd_space, n_points, retries
        self.proposed: list[dict[str, Any]] = []
        self.rng = random.Random(seed)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def suggest(self, trial_id: str) -> dict | None:
        from optuna.trial import TrialState

        config = super().suggest(trial_id)
        if not isinstance(config, dict):  # FINISHED or nothing to suggest now
            return config
        if len(self.proposed) >= self.n_points:  # the declared first points run as given
            for attempt in range(self.retries + 1):
                if not self._seen(config):
                    break
                # Tell Optuna this proposal failed (TPE ignores failed trials) and ask again;
                # TPE keeps sampling near its best, so the last attempt is a random new point.
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
                if attempt == self.retries - 1:
                    fresh = self._random_new_point()
                    if fresh is not None:
                        self._ot_study.enqueue_trial(fresh)
                config = super().suggest(trial_id)
                if not isinstance(config, dict):
                    return config
            else:
                log.warning("every point of the space is within 2%% of the %d tried: running %s again",
                            len(self.proposed), config)
        self.proposed.append(dict(config))
        return config

    def _seen(self, config: dict[str, Any]) -> bool:
        return any(is_close(config, seen, self.kd_space) for seen in self.proposed)

    def _random_new_point(self, draws: int = 500) -> dict[str, Any] | None:
        for _ in range(draws):
            point = {k: _draw(dim, self.rng) for k, dim in self.kd_space.items()}
            if not self._seen(point):
                return point
        return None


def _draw(dim: Any, rng: random.Random) -> Any:
    if isinstance(dim, Choice):
        return rng.choice(list(dim.values))
    if isinstance(dim, IntRange):
        return rng.randint(dim.low, dim.high)
    if isinstance(dim, LogUniform):
        return math.exp(rng.uniform(math.log(dim.low), math.log(dim.high)))
    return rng.uniform(dim.low, dim.high)


def searcher(objectives: list[str], space: Space, *, seed: int, budget: int,
             points: list[dict] | None = None) -> OptunaSearch:
    """TPE for one objective; TPE in multi-objective mode (metric and mode as lists) for several."""
    import optuna

    pairs = check_objectives(objectives)
    # A few random trials first, then the model: TPE's default of 10 would be a whole demo budget.
    startup = max(2, min(10, budget // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if len(pairs) == 1:
        metric, mode = pairs[0]
    else:
        metric, mode = [m for m, _ in pairs], [d for _, d in pairs]
    return _OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None,
                         kd_space=space, n_points=len(points or []), seed=seed)


class _MarginBracket(_Bracket):
    """An ASHA bracket whose cutoff is lowered by ``margin`` (in the scheduler's sign: higher
    is better), so a trial stops only when it is clearly below the rung's cutoff."""

    def __init__(self, margin: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.margin = margin

    def cutoff(self, recorded):
        cut = super().cutoff(recorded)
        return None if cut is None else cut - self.margin


class NoiseAwareASHA(ASHAScheduler):
    """ASHA that stops a trial only when its rung score is below the rung's cutoff by more
    than ``margin``, the rung's sampling noise.

    A rung scores a few items per set (:data:`kd.run.RUNG_ITEMS`), so two rung scores
    differ by a few hundredths by chance alone; plain ASHA stops the lower half on any
    difference. On the embedded world's loss-weight demo it stopped four of eight trials at
    step 50 for being 0.001-0.006 below a cutoff (scores 0.361-0.386, while the CE-only
    reference's two seeds differed by 0.016 there), and the report then showed them as
    worse. Subclassed rather than written anew so that Tune's resume, bookkeeping and
    brackets stay Tune's; only the cutoff changes.
    """

    def __init__(self, *, margin: float, metric: str, mode: str, time_attr: str, max_t: int, grace_period: int,
                 reduction_factor: float = 2) -> None:
        super().__init__(metric=metric, mode=mode, time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        self._brackets = [_MarginBracket(margin, grace_period, max_t, reduction_factor, 0)]


def rung_margin(metric: str, items: int) -> float:
    """Two standard errors of a rung score at its worst case (every accuracy at 0.5), for
    ``items`` per task set; 0 for losses (they are means over thousands of tokens).

    acc_mean averages acc_completion, acc_choice, em_qa and f1_qa: three sets, the QA one
    counted twice (em and f1 of the same items move together), so its variance is
    (1 + 1 + 4) * 0.25 / items / 16.
    """
    if metric == "acc_mean":
        return 2 * math.sqrt(6 * 0.25 / items) / 4
    if metric in TASK_METRICS:
        return 2 * math.sqrt(0.25 / items)
    return 0.0


@dataclass(frozen=True)
class Pruning:
    """What ASHA decides on: ``rung_<metric>`` at ``steps`` (all before the last step),
    stopping only trials more than ``margin`` below a rung's cutoff."""

    metric: str
    mode: str
    steps: tuple[int, ...]
    tasks: bool
    """Whether the trial must score task sets at the rungs (the metric is a task metric)."""
    margin: float = 0.0

    def meta(self) -> dict[str, Any]:
        return {"metric": self.metric, "steps": list(self.steps), "tasks": self.tasks}

    def scheduler(self, max_t: int) -> ASHAScheduler:
        # Milestones grace * 2^k; the trial reports rung_step only at the rung steps, so a
        # milestone between two evaluations is decided at the next one, and none at the end.
        return NoiseAwareASHA(margin=self.margin, metric=f"rung_{self.metric}", mode=self.mode,
                              time_attr=RUNG_STEP, max_t=max_t, grace_period=self.steps[0], reduction_factor=2)


def rung_steps(steps: int, eval_every: int) -> tuple[int, ...]:
    """Evaluation steps where ASHA decides: the first evaluation after a third of the steps,
    then each doubling, all strictly before the last evaluation (``steps``)."""
    evals = [s for s in range(eval_every, steps, eval_every)]
    if not evals:
        return ()
    first = next((s for s in evals if s >= steps / 3), None)
    if first is None:
        return ()
    out, milestone = [], first
    while milestone < steps:
        at = math.ceil(milestone / eval_every) * eval_every
        if at < steps and at not in out:
            out.append(at)
        milestone *= 2
    return tuple(out)


def pruning(objectives: list[str], steps: int, eval_every: int) -> Pruning | None:
    """The early-stopping plan of a sweep, or ``None`` when nothing may be stopped."""
    if len(objectives) != 1:
        return None  # multi-objective: a small, worse student can still be on the front
    objective = objectives[0]
    if objective in ("val_loss", "val_ppl"):
        metric, tasks = objective, False
    elif objective in (*TASK_METRICS, "acc_mean", "retention"):
        # retention is acc_mean over the teacher's constant acc_mean: the same ranking
        metric, tasks = ("acc_mean" if objective == "retention" else objective), True
    else:
        return None  # size or speed: fixed by the shape, nothing to learn at a rung
    rungs = rung_steps(steps, eval_every)
    if not rungs:
        return None
    from kd.run import RUNG_ITEMS

    return Pruning(metric, direction(metric), rungs, tasks, rung_margin(metric, RUNG_ITEMS))
