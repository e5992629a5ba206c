"""step_bench's child processes: one mode per process (``_worker``) or all modes step by step on
one student (``_interleaved``); each prints one JSON line for the parent."""
from __future__ import annotations

import json

from ..common import as_device, median, now, peak_rss_mb, quiet_logs, rss_mb, sync


# ------------------------------------------------------------------ children
class Bench:
    """Data, student, optimizer and the criteria (one per mode) of one child process."""

    def __init__(self, setup: dict, modes: list[str]) -> None:
        import torch
        if setup["threads"]:
            torch.set_num_threads(setup["threads"])
        from ldpipe.config import load_pipeline
        from ldpipe.data import DetectionDataset, VariantSampler, load_split
        from ldpipe.engine.runtime import seed_everything, train_amp
        from ldpipe.distill import TargetSource
        from ldpipe.engine.train import TrainCollate, TrainStep
        from ldpipe.models import build_model
        import ldpipe.distill  # noqa: F401  (zarr & co. before the RSS baseline, in every mode)

        self.setup = setup
        self.device = device = as_device(setup["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.init()
        self.rss_base = rss_mb()  # after imports (and the CUDA context), before models and data
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pipe = self.pipe = load_pipeline(setup["pipeline"], setup["overrides"])
        split = load_split(pipe.data, "train")
        cfg = self.cfg = pipe.model("student")
        sched = pipe.train_for("student")
        sources = {m: self._source(m, split) for m in modes}
        self.hooks = {m: self._criterion(src) for m, src in sources.items()}
        # every mode here uses the training variants (a cache's are the dump's: the same)
        variants = next((s for s in sources.values() if s is not None), TargetSource()).variants(pipe)
        self.dataset = DetectionDataset(split, pipe.data, variants)
        extras = [s.sample_extra(device) for s in sources.values() if s is not None]
        self.extra = next((e for e in extras if e is not None), None)
        self.collate = {vlr: TrainCollate(cfg, len(split.classes), vlr)
                        for vlr in {h.with_vlr for h in self.hooks.values()}}
        pairs = VariantSampler(len(self.dataset), len(variants), shuffle=True, seed=setup["seed"]).pairs()
        bsz = setup["batch"]
        batches = [pairs[i:i + bsz] for i in range(0, len(pairs), bsz)][:setup["distinct_batches"]]
        self.batches = [b for b in batches if len(b) == bsz] or batches

        seed_everything(setup["seed"])
        self.model = build_model(cfg, len(split.classes)).to(device)
        self.model.train()
        self.train_step = TrainStep(self.model, sched, device, train_amp(sched.amp, device))
        self.hook_s = 0.0

    def _source(self, mode: str, split):
        """The teacher target source of ``mode`` (None: plain GFL training), checked."""
        from ldpipe.distill import CachedTeacher, OnlineTeacher
        from ldpipe.engine.runtime import train_amp
        if mode == "plain":
            return None
        if mode == "cached":
            source = CachedTeacher(self.pipe, self.setup["cache"])
        elif mode == "online":
            sched = self.pipe.train_for("student")
            source = OnlineTeacher(self.pipe, "teacher", self.setup["teacher_ckpt"], self.device,
                                   train_amp(sched.amp, self.device))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        source.check(self.pipe, "student", split)
        return source

    def _criterion(self, source):
        """GFL's losses (plain) or the distillation criterion, its LD part timed."""
        from ldpipe.config import enabled_terms
        from ldpipe.distill import DistillCriterion, GFLCriterion
        if source is None:
            return GFLCriterion()
        crit = DistillCriterion(self.pipe.distill, enabled_terms(self.pipe), source)
        orig = crit.distill_terms

        def timed_terms(*a, **k):  # the distillation part: teacher targets + LD loss terms
            sync(self.device)
            t0 = now()
            out = orig(*a, **k)
            sync(self.device)
            self.hook_s = now() - t0
            return out

        crit.distill_terms = timed_terms
        return crit

    def batches_for(self, it: int) -> tuple[dict, float]:
        """Collated batches of step ``it`` (by with_vlr) and the time spent reading cache rows."""
        samples = [self.dataset[k] for k in self.batches[it % len(self.batches)]]
        t_fetch = 0.0
        if self.extra is not None:  # the loader's part of cached LD: read the teacher rows
            t0 = now()
            extras = [self.extra(s["meta"]) for s in samples]
            t_fetch = now() - t0
            for s, e in zip(samples, extras):
                s.update(e)
        out = {vlr: fn(samples) for vlr, fn in self.collate.items()}
        if self.device.type == "cuda":  # as the training DataLoader (pin_memory=True) hands them over
            from torch.utils.data._utils.pin_memory import pin_memory
            out = {vlr: pin_memory(b) for vlr, b in out.items()}
        return out, t_fetch

    def step(self, mode: str, batch: dict, it: int) -> tuple[float, dict]:
        """One timed training step, as ``ldpipe.engine.train.train`` runs it."""
        sync(self.device)
        t0 = now()
        self.train_step.criterion = self.hooks[mode]
        values, _ = self.train_step(batch, 0, it)
        sync(self.device)
        values.pop("loss")
        return now() - t0, values

    def memory(self) -> dict:
        import torch
        out = {"rss_base_mb": self.rss_base, "peak_rss_mb": peak_rss_mb()}
        out["peak_rss_delta_mb"] = (out["peak_rss_mb"] - self.rss_base) if self.rss_base is not None else None
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2 ** 20
        return out


def worker_main(argv: list[str]) -> None:
    """Child: ``_worker MODE SETUP_JSON`` - one mode only; prints one JSON line."""
    mode, setup = argv[0], json.loads(argv[1])
    quiet_logs()
    b = Bench(setup, [mode])
    step_s, fetch_s, hook_s, first_losses = [], [], [], None
    for it in range(setup["warmup"] + setup["steps"]):
        batches, t_fetch = b.batches_for(it)
        dt, values = b.step(mode, batches[b.hooks[mode].with_vlr], it)
        if it == 0:
            first_losses = values
        if it >= setup["warmup"]:
            step_s.append(dt)
            fetch_s.append(t_fetch)
            hook_s.append(b.hook_s)
    print(json.dumps({"mode": mode, "step_s": step_s, "fetch_s": fetch_s, "hook_s": hook_s,
                      "step_median_s": median(step_s), "fetch_median_s": median(fetch_s),
                      "hook_median_s": median(hook_s),
                      "first_losses": first_losses, **b.memory()}))


def interleaved_main(argv: list[str]) -> None:
    """Child: ``_interleaved MODES SETUP_JSON`` - every mode on every batch, round-robin
    (order rotating each round), one student; per-round paired times."""
    modes, setup = argv[0].split(","), json.loads(argv[1])
    quiet_logs()
    b = Bench(setup, modes)
    rounds = []
    for it in range(setup["warmup"] + setup["steps"]):
        batches, t_fetch = b.batches_for(it)
        k = it % len(modes)
        times, hook = {}, {}
        for m in modes[k:] + modes[:k]:
            times[m], _ = b.step(m, batches[b.hooks[m].with_vlr], it)
            hook[m] = b.hook_s
        if it >= setup["warmup"]:
            rounds.append({"times": times, "hook": hook, "fetch": t_fetch})
    print(json.dumps({"modes": modes, "rounds": rounds}))
