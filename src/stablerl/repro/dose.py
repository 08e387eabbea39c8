"""The dose-response figure and table: final reward and collapse rate of each ablation against
the *measured* training-inference KL of its engine (docs/results.md)."""

from __future__ import annotations

import statistics
from pathlib import Path

from stablerl.repro.experiments import DOSE_LEVELS, DOSE_N

FAMILIES = {  # variant suffix -> label
    "on_minirl": "on-policy MiniRL", "on_no_is": "on-policy, no IS", "on_r3": "on-policy + R3",
    "off_noreplay": f"N={DOSE_N}, no replay", "off_r2": f"N={DOSE_N} + R2", "off_r3": f"N={DOSE_N} + R3",
}


def dose_points(runs: dict) -> dict[str, list[dict]]:
    """Per family, one point per engine level: measured KL (k3, k1), routing agreement, final
    reward (mean, std over seeds) and collapse rate."""
    from stablerl.repro.report import run_stats

    out: dict[str, list[dict]] = {}
    for family in FAMILIES:
        for level in DOSE_LEVELS:
            stats = [run_stats(s, rows, n) for s, rows, n in runs.get(f"{level}/{family}", [])]
            if not stats:
                continue
            rewards = [s["final_reward"] for s in stats]
            out.setdefault(family, []).append({
                "level": level, "seeds": len(stats),
                "kl": statistics.mean(s["mean_train_infer_kl"] for s in stats),
                "kl_k1": statistics.mean(s["mean_train_infer_kl_k1"] for s in stats),
                "route_agreement": statistics.mean(s["route_agreement"] for s in stats),
                "reward": statistics.mean(rewards), "reward_std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
                "acc": statistics.mean(s["final_acc"] for s in stats),
                "collapse_rate": sum(s["collapse_step"] is not None for s in stats) / len(stats),
            })
    return out


def dose_table(points: dict[str, list[dict]]) -> str:
    """Markdown: one row per engine level, the measured mismatch, then each family's final reward
    (collapsed seeds in brackets)."""
    levels = [lv for lv in DOSE_LEVELS if any(p["level"] == lv for ps in points.values() for p in ps)]
    fams = [f for f in FAMILIES if f in points]
    head = ["engine", "KL k3 (on-policy runs)", "KL k1", "routing agreement"] + [FAMILIES[f] for f in fams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in levels:
        ref = next((p for f in ("on_minirl", *fams) for p in points.get(f, []) if p["level"] == lv), None)
        cells = [lv, f"{ref['kl']:.2e}", f"{ref['kl_k1']:.2e}", f"{ref['route_agreement']:.4f}"]
        for f in fams:
            p = next((p for p in points[f] if p["level"] == lv), None)
            cells.append("-" if p is None else
                         f"{p['reward']:.3f} ± {p['reward_std']:.3f} ({round(p['collapse_rate'] * p['seeds'])}/{p['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_dose_response(runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = dose_points(runs)
    Path(path).with_name("dose_table.md").write_text(dose_table(points))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for i, (family, label) in enumerate(FAMILIES.items()):
        pts = sorted(points.get(family, []), key=lambda p: p["kl"])
        if not pts:
            continue
        xs = [max(p["kl"], 1e-8) for p in pts]
        ax = axes[0] if family.startswith("on_") else axes[1]
        ax.errorbar(xs, [p["reward"] for p in pts], yerr=[p["reward_std"] for p in pts], marker="o", capsize=3,
                    color=f"C{i}", label=label)
        axes[2].plot(xs, [p["collapse_rate"] for p in pts], marker="o", color=f"C{i}", label=label)
        for p, x in zip(pts, xs):
            if family in ("on_minirl", "off_r2"):
                ax.annotate(p["level"], (x, p["reward"]), fontsize=7, textcoords="offset points", xytext=(3, -10))
    for ax, title in zip(axes, ("on-policy: final training reward", f"off-policy N = {DOSE_N}: final training reward",
                                "collapse rate")):
        ax.set_xscale("log")
        ax.set_xlabel("measured training-inference KL (k3, mean over the run)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dose-response: where each practice starts to matter (mean ± std over seeds)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
