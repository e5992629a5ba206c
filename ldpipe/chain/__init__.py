"""``ldpipe chain``: teacher -> (TA ...) -> student from one pipeline file.

The stages are ordinary ``ldpipe`` invocations (``train``, ``dump-teacher``,
``train-student``, ``eval``), run in this process through the same command
line parser (or, with ``jobs >= 2``, the students' in child processes) and
printed, so any one can be rerun by hand.  Each stage has a stamp under
``WORK_DIR/.chain/`` holding the hash of its inputs: the pipeline sections it
reads, the sha256 of the checkpoint and the id of the cache it consumes.  A
stage whose stamp matches and whose outputs exist is skipped; a changed input
reruns that stage and, through the new checkpoint hash or cache id,
everything downstream.  A stage that was interrupted resumes (training
continues from its last epoch; a dump finishes its missing units) as long as
its inputs are unchanged, and starts clean otherwise.

``[chain]`` keys (all optional)::

    teacher = "teacher"     # root teacher model; trained unless models.<name>.checkpoint is set
    tas = ["ta"]            # teacher assistants, in order (each trained from the previous cache)
    student = "student"
    baseline = true         # also train the student without distillation
    eval_split = "val"
    seeds = [0, 1, 2]       # train each student row once per seed (train.seed), in work dirs
                            # <student>-baseline-s<seed> / <student>-ld-s<seed>; the summary
                            # gives mean +- std and every seed.  Default: one training per row
    jobs = 1                # N >= 2: the student trainings (and their evaluations) run in up
                            # to N child processes; the baselines, which need nothing from the
                            # teacher, start while the teacher trains.  Their output goes to
                            # WORK_DIR/.chain/<stage>.log
"""
from .plan import CHAIN_KEYS, ChainError, ChainPlan, plan_of
from .runner import Chain, Stage, without_later
from .summary import Row, loss_curve, role_stats, write_summary

__all__ = ["CHAIN_KEYS", "Chain", "ChainError", "ChainPlan", "Row", "Stage", "loss_curve",
           "plan_of", "role_stats", "without_later", "write_summary"]
