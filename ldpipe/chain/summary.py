"""The chain's summary: a table of AP / AP50 / AP75 per row (mean +- std and every seed when
a row was trained once per seed), the distilled-minus-baseline gain, and a chart (bars with
each seed's point, beside every trained stage's loss curve)."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from ..config import Pipeline
from ..models.detector import backbone_label

METRICS = ("AP", "AP50", "AP75")
KEYS = {"AP": "bbox_mAP", "AP50": "bbox_mAP_50", "AP75": "bbox_mAP_75"}
DISTILLED = "LD student"  # the distilled row of an LD recipe (method_role names the others)
BASELINE = "baseline student"
# [distill] terms -> the method a distilled row is named after
METHOD_OF = {"ld": "LD", "vlr": "LD", "kd": "LD", "bckd_cls": "BCKD", "bckd_box": "BCKD",
             "crosskd_cls": "CrossKD", "crosskd_reg": "CrossKD"}


def method_role(terms: set[str]) -> str:
    """The distilled student's row name from the enabled ``[distill]`` terms: "LD student",
    "BCKD student", "CrossKD student", or e.g. "LD + BCKD student" for a combination."""
    methods = sorted({METHOD_OF[t] for t in terms}, key=["LD", "BCKD", "CrossKD"].index)
    return f"{' + '.join(methods) or 'distilled'} student"


def _distilled(roles: list[str]) -> str | None:
    """The distilled row among the chain's roles: the student row that is not the baseline."""
    return next((r for r in roles if r.endswith(" student") and r != BASELINE), None)
MARGIN = 1.0  # AP: the gain the summary checks a distilled row's mean against


@dataclass(frozen=True)
class Row:
    """One evaluated model of the chain: its role, model name, ``metrics.json`` and the
    ``train.seed`` it was trained with (None: the pipeline's own, one training per row)."""
    role: str
    model: str
    metrics: str
    seed: int | None = None


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _entries(rows: list[Row], pipe: Pipeline) -> list[dict]:
    out = []
    for r in rows:
        with open(r.metrics) as fh:
            m = json.load(fh)
        cfg = pipe.model(r.model)
        width = "" if cfg.base_channels == 64 else f" w{cfg.base_channels}"
        out.append({"role": r.role, "model": r.model, "seed": r.seed,
                    "backbone": f"{backbone_label(cfg.backbone)}{width}, {cfg.channels} ch",
                    **{k: m[KEYS[k]] for k in METRICS}})
    return out


def role_stats(entries: list[dict]) -> list[dict]:
    """Entries grouped by role, in order: mean and sample std (in AP %) of each metric and
    the AP of every seed."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["role"], []).append(e)
    stats = []
    for role, es in groups.items():
        s = {"role": role, "model": es[0]["model"], "backbone": es[0]["backbone"],
             "seeds": [e["seed"] for e in es], "AP_per_seed": [e["AP"] * 100 for e in es]}
        for k in METRICS:
            vals = [e[k] * 100 for e in es]
            s[k], s[f"{k}_std"] = statistics.fmean(vals), _std(vals)
        stats.append(s)
    return stats


def gain_check(stats: list[dict], entries: list[dict]) -> dict | None:
    """The distilled row against the baseline: the difference of the means, the per-seed
    differences (paired by seed), and whether the distilled mean is >= the baseline mean +
    :data:`MARGIN` and above every baseline seed."""
    by_role = {s["role"]: s for s in stats}
    distilled = _distilled(list(by_role))
    if distilled is None or BASELINE not in by_role:
        return None
    ld, base = by_role[distilled], by_role[BASELINE]
    ap = {(e["role"], e["seed"]): e["AP"] * 100 for e in entries}
    paired = [s for s in ld["seeds"] if s in base["seeds"]]
    per_seed = [ap[(distilled, s)] - ap[(BASELINE, s)] for s in paired]
    best_base = max(base["AP_per_seed"])
    return {"role": distilled, "gain": {k: ld[k] - base[k] for k in METRICS},
            "per_seed": dict(zip([str(s) for s in paired], per_seed)),
            "per_seed_std": _std(per_seed),
            "margin": MARGIN, "above_margin": ld["AP"] >= base["AP"] + MARGIN,
            "baseline_best_seed": best_base, "above_every_baseline_seed": ld["AP"] > best_base}


def _fmt(s: dict, k: str, seeded: bool) -> str:
    return f"{s[k]:.1f} +- {s[k + '_std']:.1f}" if seeded and len(s["seeds"]) > 1 else f"{s[k]:.1f}"


def table(stats: list[dict], check: dict | None, pipe: Pipeline) -> str:
    seeded = any(len(s["seeds"]) > 1 for s in stats)
    if not seeded:
        lines = ["| role | model | backbone | AP | AP50 | AP75 |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['role']} | {s['model']} | {s['backbone']} | "
                  + " | ".join(f"{s[k]:.1f}" for k in METRICS) + " |" for s in stats]
        if check:
            gain = " / ".join(f"{check['gain'][k]:+.1f} {k}" for k in METRICS)
            lines += ["", f"{check['role']} - baseline student: {gain} (one training each, train.seed = "
                          f"{pipe.train.seed}; single runs move by a few AP with the seed)"]
        return "\n".join(lines)
    lines = ["| role | model | backbone | seeds | AP | AP50 | AP75 | AP of each seed |",
             "|---|---|---|---|---|---|---|---|"]
    for s in stats:
        seeds = ", ".join("-" if x is None else str(x) for x in s["seeds"])
        each = " / ".join(f"{v:.1f}" for v in s["AP_per_seed"]) if len(s["seeds"]) > 1 else ""
        lines.append(f"| {s['role']} | {s['model']} | {s['backbone']} | {seeds} | "
                     + " | ".join(_fmt(s, k, True) for k in METRICS) + f" | {each} |")
    if check:
        gain = " / ".join(f"{check['gain'][k]:+.1f} {k}" for k in METRICS)
        per = " / ".join(f"{v:+.1f}" for v in check["per_seed"].values())
        seeds = ", ".join(check["per_seed"])
        yes = {True: "yes", False: "NO"}
        name = check["role"].removesuffix(" student")
        lines += ["", f"{check['role']} - baseline student (means, AP +- = sample std over seeds): {gain}; "
                      f"per seed ({seeds}) {per} AP",
                  f"{name} mean >= baseline mean + {check['margin']:.1f} AP: {yes[check['above_margin']]}; "
                  f"above every baseline seed (best {check['baseline_best_seed']:.1f}): "
                  f"{yes[check['above_every_baseline_seed']]}"]
    return "\n".join(lines)


def write_summary(work_dir: str, rows: list, pipe: Pipeline) -> dict:
    """Table of AP / AP50 / AP75 per row: printed, and as markdown, JSON and a PNG chart.
    ``rows``: :class:`Row` s (or ``(role, model, metrics_path[, seed])`` tuples)."""
    rows = [r if isinstance(r, Row) else Row(*r) for r in rows]
    entries = _entries(rows, pipe)
    stats = role_stats(entries)
    check = gain_check(stats, entries)
    text = table(stats, check, pipe)
    with open(os.path.join(work_dir, "summary.md"), "w") as fh:
        fh.write(f"# {pipe.name}: chain summary\n\n{text}\n")
    curves = {f"{r.role}: {os.path.basename(os.path.dirname(r.metrics))}": loss_curve(os.path.dirname(r.metrics))
              for r in rows}
    curves = {k: v for k, v in curves.items() if v[0]}  # a given checkpoint has no training
    with open(os.path.join(work_dir, "summary.json"), "w") as fh:
        json.dump({"pipeline": pipe.name, "rows": entries, "roles": stats, "gain_check": check,
                   "loss_curves": {k: {"points": len(v[0]), "first_iter": v[0][0], "last_iter": v[0][-1],
                                       "last_loss": v[1][-1]} for k, v in curves.items()}},
                  fh, indent=2)
    _chart(os.path.join(work_dir, "summary.png"), stats, entries, pipe.name, curves)
    return {"table": text, "rows": entries, "roles": stats, "gain_check": check}


def loss_curve(stage_dir: str) -> tuple[list[int], list[float]]:
    """(iterations, total loss) of a training stage's ``metrics.jsonl`` (its ``train``
    records; its ``epoch`` records when it logged none); empty without the file."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    picked = [r for r in records if r.get("type") == "train"] or \
             [r for r in records if r.get("type") == "epoch"]
    picked = [r for r in picked if "loss" in r]
    return [int(r["iter"]) for r in picked], [float(r["loss"]) for r in picked]


def _chart(path: str, stats: list[dict], entries: list[dict], title: str,
           curves: dict[str, tuple[list[int], list[float]]] | None = None) -> None:
    """Bars: each row's mean per metric, its std as an error bar, each seed as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curves:
        fig, (ax, lax) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=110)
        for label, (iters, losses) in curves.items():
            lax.plot(iters, losses, label=label, linewidth=1)
        lax.set_xlabel("iteration")
        lax.set_ylabel("training loss (all terms)")
        lax.set_title("loss curves (metrics.jsonl of each stage)")
        lax.legend(fontsize=6 if len(curves) > 4 else 7, loc="upper right")
    else:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    width = 0.8 / max(len(stats), 1)
    top = max([e[m] * 100 for e in entries for m in METRICS] or [1.0])
    ax.set_ylim(0, top * 1.4)  # headroom: the legend sits above the tallest bar's label
    for i, s in enumerate(stats):
        xs = [j + i * width for j in range(len(METRICS))]
        many = len(s["seeds"]) > 1
        n = f", {len(s['seeds'])} seeds" if many else ""
        bars = ax.bar(xs, [s[m] for m in METRICS], width, yerr=[s[f"{m}_std"] for m in METRICS] if many else None,
                      capsize=2, label=f"{s['role']} ({s['backbone']}{n})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        if many:
            es = [e for e in entries if e["role"] == s["role"]]
            for j, m in enumerate(METRICS):
                ax.scatter([xs[j]] * len(es), [e[m] * 100 for e in es], s=6, color="black", zorder=3)
    ax.set_xticks([j + width * (len(stats) - 1) / 2 for j in range(len(METRICS))], METRICS)
    ax.set_ylabel("COCO-style AP (%)")
    ax.set_title(f"{title}: teacher -> student localization distillation")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
