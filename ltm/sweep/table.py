"""A sweep's table from its point records: `sweep.json`, `sweep.md` and `sweep.png`.

Per variant, head and test set: the mean test AUC over seeds with its 95% t-interval (and the mean over the sets).
Per variant and head against the reference variant's first head: the paired difference per seed, per test set and
over the sets' mean, with its interval and a verdict. With several budgets: the val learning curves. Every number
comes from `ltm.sweep.stats`.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ltm.eval.report.tables import markdown_table
from ltm.sweep import stats
from ltm.sweep.run import Sweep, is_done, read_record, write_json

MEAN = "mean over sets"


def _records(sweep: Sweep) -> tuple[dict[tuple[str, int], dict], list[str]]:
    records, missing = {}, []
    for variant, seed in sweep.points():
        record = read_record(sweep.record_path(variant, seed))
        if is_done(record):
            records[variant, seed] = record
        else:
            missing.append(f"{variant} seed {seed} ({record['status'] if record else 'not started'})")
    return records, missing


def seed_scores(records: dict[tuple[str, int], dict], variant: str, head: str,
                sets: list[str]) -> dict[str, dict[int, float]]:
    """{test set or MEAN: {seed: AUC}} of one variant's head, keyed by seed (what pairing matches on)."""
    out: dict[str, dict[int, float]] = {s: {} for s in [*sets, MEAN]}
    for (v, seed), record in records.items():
        if v != variant or head not in record["test"]:
            continue
        aucs = record["test"][head]
        for s in sets:
            out[s][seed] = aucs[s]
        out[MEAN][seed] = statistics.fmean(aucs[s] for s in sets)
    return out


def collect(sweep: Sweep) -> dict[str, Any]:
    """The sweep's table as a dict (what sweep.json holds)."""
    records, missing = _records(sweep)
    sets = list(sweep.evals)
    rows, comparisons, curves = [], [], []
    heads: dict[str, list[str]] = {}
    for variant in sweep.variants:
        mine = [r for (v, _), r in records.items() if v == variant]
        heads[variant] = mine[0]["heads"] if mine else []
        for head in heads[variant]:
            scores = seed_scores(records, variant, head, sets)
            cells = {s: stats.interval(list(v.values())).as_dict() if v else None for s, v in scores.items()}
            rows.append({"variant": variant, "head": head, "seeds": sorted(scores[MEAN]), "test": cells,
                         "per_seed": {s: {str(k): round(x, 6) for k, x in sorted(v.items())}
                                      for s, v in scores.items()},
                         "selected": {str(seed): r["selected"] for (v, seed), r in sorted(records.items())
                                      if v == variant}})
            if len(sweep.budgets) > 1:
                curve = {}
                for budget in sweep.budgets:
                    vals = [r["val"][str(budget)][head] for (v, _), r in sorted(records.items())
                            if v == variant and str(budget) in r["val"]]
                    if vals:
                        curve[str(budget)] = stats.interval(vals).as_dict()
                curves.append({"variant": variant, "head": head, "val": curve})
    ref_head = heads[sweep.reference][0] if heads.get(sweep.reference) else None
    if ref_head is not None:
        ref = seed_scores(records, sweep.reference, ref_head, sets)
        for variant in sweep.variants:
            for head in heads[variant]:
                if (variant, head) == (sweep.reference, ref_head):
                    continue
                mine = seed_scores(records, variant, head, sets)
                per_set = {}
                for s in [*sets, MEAN]:
                    if not mine[s] or not ref[s]:
                        continue
                    p = stats.paired(mine[s], ref[s])
                    v = stats.verdict(p.interval, sweep.effect)
                    per_set[s] = {"diff": p.interval.as_dict(), "per_seed": {str(k): round(x, 6) for k, x in
                                                                             p.per_seed.items()},
                                  "unpaired_seeds": list(p.missing), "verdict": v.word, "n_needed": v.n_needed,
                                  "text": v.text()}
                comparisons.append({"variant": variant, "head": head, "reference": sweep.reference,
                                    "reference_head": ref_head, "sets": per_set})
    provenance = sorted({(r["provenance"]["host"], r["provenance"]["cpu"], r["provenance"]["gpu"] or "-",
                          r["provenance"]["commit"] or "-") for r in records.values()})
    return {"config": sweep.config, "variants": sweep.variants, "overrides": sweep.overrides, "seeds": sweep.seeds,
            "budgets": sweep.budgets, "evals": sets, "reference": sweep.reference, "effect": sweep.effect,
            "metric": "frame AUC on each test set, of the checkpoint val selected; 95% t-intervals over seeds",
            "rows": rows, "comparisons": comparisons, "curves": curves, "missing": missing,
            "machines": [dict(zip(("host", "cpu", "gpu", "commit"), m)) for m in provenance]}


def _cell(d: dict | None, signed: bool = False) -> str:
    if not d:
        return "—"
    f = "{:+.4f}" if signed else "{:.4f}"
    if d["lo"] is None:
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} ({f.format(d['lo'])} .. {f.format(d['hi'])})"


def label(test_set: str) -> str:
    """A test set's column name: as given, or the last two parts of an absolute path (`dataset/split`)."""
    path = Path(test_set)
    return "/".join(path.parts[-2:]) if path.is_absolute() else test_set


def sweep_markdown(result: dict[str, Any]) -> str:
    sets = [*result["evals"], MEAN]
    names = [label(s) for s in sets]
    lines = [f"# Sweep: {result['config']}, {len(result['seeds'])} seeds, budgets {result['budgets']}", "",
             f"{result['metric']}. Variants: " + "; ".join(f"`{k}`: {' '.join(v) or '(the config)'}"
                                                         for k, v in result["variants"].items()) + ".", ""]
    lines += markdown_table(["variant", "head", *names], [[row["variant"], row["head"],
                                                           *(_cell(row["test"][s]) for s in sets)]
                                                          for row in result["rows"]], align="ll" + "r" * len(sets))
    if result["comparisons"]:
        lines += ["", f"Paired by seed against `{result['reference']}` (difference, 95% t-interval):", ""]
        lines += markdown_table(["variant", "head", *names], [
            [c["variant"], c["head"], *(_cell(c["sets"].get(s, {}).get("diff"), signed=True) for s in sets)]
            for c in result["comparisons"]], align="ll" + "r" * len(sets))
        lines += ["", "Per seed (variant − reference, mean over sets): " + "; ".join(
            f"{c['variant']}/{c['head']} " + ", ".join(f"seed {k} {v:+.4f}" for k, v in
                                                    c["sets"].get(MEAN, {}).get("per_seed", {}).items())
            for c in result["comparisons"]), "", "Verdicts (mean over sets, effect "
                  f"{result['effect']:+.3f}):", ""]
        for c in result["comparisons"]:
            m = c["sets"].get(MEAN)
            if m:
                per_set = "; ".join(f"{label(k)}: {v['verdict']}" for k, v in c["sets"].items() if k != MEAN)
                lines.append(f"- {c['variant']}/{c['head']} vs {c['reference']}/{c['reference_head']}: {m['text']}"
                             + (f" (per set: {per_set})" if len(c["sets"]) > 2 else ""))
    if result["curves"]:
        budgets = [str(b) for b in result["budgets"]]
        lines += ["", "Learning curves (val AUC, mean over seeds, 95% t-interval):", ""]
        lines += markdown_table(["variant", "head", *budgets], [
            [c["variant"], c["head"], *(_cell(c["val"].get(b)) for b in budgets)] for c in result["curves"]],
                                align="ll" + "r" * len(budgets))
    if result["missing"]:
        lines += ["", f"Not finished ({len(result['missing'])}): " + ", ".join(result["missing"])]
    lines += ["", "Machines: " + "; ".join(f"{m['host']} ({m['cpu']}, GPU {m['gpu']}, commit {m['commit'][:12]})"
                                          for m in result["machines"])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean test AUC with its interval per variant/head and test set; the val learning curves beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [*result["evals"], MEAN]
    ncols = 2 if result["curves"] else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(result["rows"]))
    for i, row in enumerate(result["rows"]):
        xs, ys, err = [], [], [[], []]
        for j, s in enumerate(sets):
            c = row["test"][s]
            if not c:
                continue
            xs.append(j + (i - (len(result["rows"]) - 1) / 2) * width)
            ys.append(c["mean"])
            lo = c["lo"] if c["lo"] is not None else c["mean"]
            hi = c["hi"] if c["hi"] is not None else c["mean"]
            err[0].append(c["mean"] - lo)
            err[1].append(hi - c["mean"])
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=f"{row['variant']} {row['head']}")
    ax.set_xticks(range(len(sets)), [label(s) for s in sets], rotation=15, fontsize=8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -0.02), min(hi, 1.02))  # an interval past AUC's own range shows as cut, not as scale
    ax.set_ylabel("frame AUC (95% t-interval over seeds)")
    ax.ticklabel_format(axis="y", useOffset=False)  # AUCs near 1 read as 0.9999, not as "+1" and offsets
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result["curves"]:
        ax = axes[0][1]
        for c in result["curves"]:
            bs = [int(b) for b in c["val"]]
            means = [c["val"][b]["mean"] for b in c["val"]]
            line, = ax.plot(bs, means, marker="o", label=f"{c['variant']} {c['head']}")
            lo = [c["val"][b]["lo"] if c["val"][b]["lo"] is not None else c["val"][b]["mean"] for b in c["val"]]
            hi = [c["val"][b]["hi"] if c["val"][b]["hi"] is not None else c["val"][b]["mean"] for b in c["val"]]
            ax.fill_between(bs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("val frame AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(sweep: Sweep) -> dict[str, Any]:
    """Collect, write sweep.json / sweep.md / sweep.png under the sweep's folder; returns the table."""
    result = collect(sweep)
    write_json(sweep.out / "sweep.json", result)
    md = sweep_markdown(result)
    tmp = sweep.out / ".sweep.md.tmp"
    tmp.write_text(md)
    tmp.replace(sweep.out / "sweep.md")
    if result["rows"] and any(r["per_seed"][MEAN] for r in result["rows"]):
        plot(result, sweep.out / "sweep.png")
    return result

