"""Turn ``run_lab``'s result into a console table and a PNG figure."""

from __future__ import annotations

from pathlib import Path


def _rows(result: dict) -> list[tuple[str, str, dict]]:
    rows = []
    for r in result["discrepancy"]:
        rows.append(("discrepancy", f"noise {r['noise']:g}", r))
    for r in result["casts"]:
        rows.append(("discrepancy", f"cast {r['precision']}", r))
    for r in result["staleness"]:
        rows.append(("staleness", f"{r['steps']} steps", r))
    return rows


def _short(name: str) -> str:
    return name.removeprefix("minirl_").replace("untruncated_is", "full_is") if name != "minirl" else name


def format_table(result: dict) -> str:
    """Two blocks (cosine, relative error) of sweep points x surrogates, plus the measured KLs."""
    names = list(result["surrogates"])
    width = max(len(_short(n)) for n in names)
    head = f"{'sweep':<12}{'point':<12}{'KL(mu||pi_old)':>15}{'KL(old||theta)':>15}{'1st-order gap':>14}"
    lines = [
        f"stablerl lab: {result['responses']} responses enumerated, {result['parameters']} parameters, "
        f"expected reward {result['expected_reward']:.3f} after {result['warm_start_steps']} warm-start steps, "
        f"{result['seconds']:.1f} s",
    ]
    for metric, title in (
        ("cosine", "cosine(surrogate grad, true grad)"),
        ("rel_error", "relative error |g - g*| / |g*|"),
        ("rel_std", "one-sample estimator: sqrt(total variance) / |g*| (one response y ~ mu_old)"),
    ):
        lines += ["", title, head + "".join(f"{_short(n):>{width + 1}}" for n in names)]
        for sweep, point, r in _rows(result):
            cells = "".join(f"{r['surrogates'][n][metric]:>{width + 1}.4f}" for n in names)
            lines.append(
                f"{sweep:<12}{point:<12}{r['train_infer_kl']:>15.2e}{r['staleness_kl']:>15.2e}"
                f"{r['first_order_gap']:>14.4f}{cells}"
            )
    lines += ["", "closest to the true gradient (smallest relative error; ties within 1% of it listed together)"]
    for sweep, point, r in _rows(result):
        lines.append(f"{sweep:<12}{point:<12}{', '.join(closest(r))}")
    lines += ["", "columns: " + ", ".join(f"{_short(n)} = {n}" for n in names if _short(n) != n)]
    return "\n".join(lines)


def closest(point: dict, tolerance: float = 0.01) -> list[str]:
    """The surrogates whose relative error is within ``tolerance`` (relative) of the smallest."""
    errors = {n: s["rel_error"] for n, s in point["surrogates"].items()}
    best = min(errors.values())
    return [_short(n) for n, e in errors.items() if e <= best * (1 + tolerance) + 1e-12]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["surrogates"])
    fig, axes = plt.subplots(2, 3, figsize=(19, 9), constrained_layout=True)
    panels = [
        ("discrepancy", "train_infer_kl", "training-inference KL(mu_old || pi_old) per token"),
        ("staleness", "staleness_kl", "staleness KL(pi_old || pi_theta) per token"),
    ]
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    # several surrogates coincide exactly in a pure sweep (e.g. clipping is inactive at theta =
    # theta_old): wide solid lines under thin dashed ones keep every curve visible
    styles = {
        n: dict(
            ls=["-", "--", ":", "-."][i % 4],
            marker="osD^v<>"[i % 7],
            lw=max(0.8, 3.5 - 0.22 * i),
            ms=max(2.5, 7 - 0.35 * i),
        )
        for i, n in enumerate(names)
    }
    for row, (sweep, key, xlabel) in enumerate(panels):
        points = result[sweep]
        xs = [p[key] for p in points]
        for col, (metric, ylabel) in enumerate(
            (
                ("cosine", "cosine to true gradient"),
                ("rel_error", "relative error to true gradient"),
                ("rel_std", "one-sample std / |true gradient|"),
            )
        ):
            ax = axes[row, col]
            for n in names:
                ax.plot(xs, [p["surrogates"][n][metric] for p in points], color=colors[n], label=n, **styles[n])
                if sweep == "discrepancy":
                    for c in result["casts"]:
                        ax.plot(c[key], c["surrogates"][n][metric], "*", color=colors[n], ms=11)
            ax.set_xscale("symlog", linthresh=1e-5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if metric == "rel_error":
                ax.set_yscale("symlog", linthresh=1e-3)  # the zero point stays visible
    axes[0, 0].set_title("pure discrepancy (stars: bf16 / fp16 / fp8 casts of pi_old)")
    axes[1, 0].set_title("pure staleness (theta k Adam steps from theta_old)")
    axes[0, 2].legend(fontsize=7, ncol=2)
    fig.suptitle("Exact expected gradient of token-level surrogates vs the true sequence-level gradient")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
