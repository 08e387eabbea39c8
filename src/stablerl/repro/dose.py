"""The dose-response figure and tables: each ablation's outcome against the *measured*
training-inference KL of its engine (docs/results.md).

Two outcomes, because under a large mismatch they part: the final *training reward* is the reward
of the engine's samples (mu, noise and all), the final *held-out accuracy* is that of the policy
itself (pi, evaluated in fp32 without the engine's noise). A learner without IS correction
follows the engine's samples; with it, the policy. Also the drop of held-out accuracy from its
peak, and the collapse rate by the report's definition."""

from __future__ import annotations

import statistics
from pathlib import Path

from stablerl.repro.experiments import DOSE_LEVELS, DOSE_N
from stablerl.repro.stats import run_stats

FAMILIES = {  # variant suffix -> label
    "on_minirl": "on-policy MiniRL",
    "on_no_is": "on-policy, no IS",
    "on_r3": "on-policy + R3",
    "off_noreplay": f"N={DOSE_N}, no replay",
    "off_r2": f"N={DOSE_N} + R2",
    "off_r3": f"N={DOSE_N} + R3",
}


def dose_points(runs: dict) -> dict[str, list[dict]]:
    """Per family, one point per engine level: measured KL (k3, k1), routing agreement, final
    reward (mean, std over seeds) and collapse rate."""
    out: dict[str, list[dict]] = {}
    for family in FAMILIES:
        for level in DOSE_LEVELS:
            stats = [run_stats(s, rows, n) for s, rows, n in runs.get(f"{level}/{family}", [])]
            if not stats:
                continue
            rewards = [s["final_reward"] for s in stats]
            accs = [s["final_acc"] for s in stats]
            out.setdefault(family, []).append(
                {
                    "level": level,
                    "seeds": len(stats),
                    "kl": statistics.mean(s["mean_train_infer_kl"] for s in stats),
                    "kl_k1": statistics.mean(s["mean_train_infer_kl_k1"] for s in stats),
                    "route_agreement": statistics.mean(s["route_agreement"] for s in stats),
                    "reward": statistics.mean(rewards),
                    "reward_std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
                    "acc": statistics.mean(accs),
                    "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "drop": statistics.mean(s["peak_acc"] - s["final_acc"] for s in stats),
                    "collapse_rate": sum(s["collapse_step"] is not None for s in stats) / len(stats),
                }
            )
    return out


def dose_table(points: dict[str, list[dict]]) -> str:
    """Markdown: two tables with one row per engine level and its measured mismatch: each family's
    final training reward (collapsed seeds in brackets), then its final held-out accuracy (and
    the drop from its peak)."""
    levels = [lv for lv in DOSE_LEVELS if any(p["level"] == lv for ps in points.values() for p in ps)]
    fams = [f for f in FAMILIES if f in points]
    head = ["engine", "KL k3 (on-policy runs)", "KL k1", "routing agreement"] + [FAMILIES[f] for f in fams]

    def table(cell) -> list[str]:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lv in levels:
            ref = next((p for f in ("on_minirl", *fams) for p in points.get(f, []) if p["level"] == lv), None)
            cells = [lv, f"{ref['kl']:.2e}", f"{ref['kl_k1']:.2e}", f"{ref['route_agreement']:.4f}"]
            for f in fams:
                p = next((p for p in points[f] if p["level"] == lv), None)
                cells.append("-" if p is None else cell(p))
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    reward = table(
        lambda p: f"{p['reward']:.3f} ± {p['reward_std']:.3f} ({round(p['collapse_rate'] * p['seeds'])}/{p['seeds']})"
    )
    acc = table(lambda p: f"{p['acc']:.3f} ± {p['acc_std']:.3f} (-{p['drop']:.3f})")
    return (
        "Final training reward (the engine's samples, mu), mean ± std over seeds (collapsed/seeds):\n\n"
        + "\n".join(reward)
        + "\n\nFinal held-out accuracy (the policy pi, fp32, no engine noise), "
        "mean ± std over seeds (drop from the peak):\n\n" + "\n".join(acc) + "\n"
    )


def plot_dose_response(points: dict[str, list[dict]], path: Path) -> Path:
    """The figure of ``dose_points``: outcomes (top: training reward, bottom: held-out accuracy)
    against the measured KL, on-policy and off-policy side by side, then collapse rate and drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    for i, (family, label) in enumerate(FAMILIES.items()):
        pts = sorted(points.get(family, []), key=lambda p: p["kl"])
        if not pts:
            continue
        xs = [max(p["kl"], 1e-8) for p in pts]
        col = 0 if family.startswith("on_") else 1
        for row, (key, err) in enumerate((("reward", "reward_std"), ("acc", "acc_std"))):
            ax = axes[row, col]
            ax.errorbar(
                xs, [p[key] for p in pts], yerr=[p[err] for p in pts], marker="o", capsize=3, color=f"C{i}", label=label
            )
            if family in ("on_minirl", "off_r2"):
                for p, x in zip(pts, xs):
                    ax.annotate(p["level"], (x, p[key]), fontsize=7, textcoords="offset points", xytext=(3, -10))
        axes[0, 2].plot(xs, [p["collapse_rate"] for p in pts], marker="o", color=f"C{i}", label=label)
        axes[1, 2].plot(xs, [p["drop"] for p in pts], marker="o", color=f"C{i}", label=label)
    titles = (
        "on-policy: final training reward (engine, mu)",
        f"N = {DOSE_N}: final training reward (engine, mu)",
        "collapse rate",
        "on-policy: final held-out accuracy (policy, pi)",
        f"N = {DOSE_N}: final held-out accuracy (policy, pi)",
        "held-out accuracy: drop from peak",
    )
    for ax, title in zip(axes.flat, titles):
        ax.set_xscale("log")
        ax.set_xlabel("measured training-inference KL (k3, mean over the run)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dose-response: where each practice starts to matter (mean ± std over seeds)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
