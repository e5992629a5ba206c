"""What a pipeline's ``[chain]`` section asks for: the models of each stage, the student seeds
and how many processes may train at once."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, Pipeline

CHAIN_KEYS = {"teacher", "tas", "student", "baseline", "eval_split", "jobs", "seeds"}


class ChainError(ConfigError):
    """A stage run in a child process failed (one line per cause; exit code 1)."""


@dataclass
class ChainPlan:
    teacher: str
    tas: list[str]
    student: str
    baseline: bool
    eval_split: str
    jobs: int = 1
    # train.seed of each student row (baseline and distilled), one training per seed; empty:
    # one training per row at the pipeline's train.seed, under the row's plain work dir name
    seeds: list[int] = field(default_factory=list)

    def student_runs(self) -> list[int | None]:
        """The seed of each student training of a row (None: the pipeline's own train.seed)."""
        return list(self.seeds) or [None]


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_of(pipe: Pipeline) -> ChainPlan:
    c = dict(pipe.chain)
    unknown = set(c) - CHAIN_KEYS
    if unknown:
        raise ConfigError(f"{pipe.source}: unknown key(s) in [chain]: {sorted(unknown)}")
    tas = c.get("tas", ["ta"] if "ta" in pipe.models else [])
    jobs = c.get("jobs", 1)
    if not _int(jobs) or jobs < 1:
        raise ConfigError(f"{pipe.source}: chain.jobs must be an integer >= 1, got {jobs!r}")
    seeds = c.get("seeds", [])
    if not isinstance(seeds, list) or not all(_int(s) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{pipe.source}: chain.seeds must be a list of distinct integers >= 0 "
                          f"(each student row trained once per seed), got {seeds!r}")
    plan = ChainPlan(c.get("teacher", "teacher"), list(tas), c.get("student", "student"),
                     bool(c.get("baseline", True)), c.get("eval_split", "val"), jobs, list(seeds))
    for name in [plan.teacher, *plan.tas, plan.student]:
        pipe.model(name)  # names a missing model clearly
    return plan
