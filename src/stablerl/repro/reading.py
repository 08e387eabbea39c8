"""The pre-registered reading of the next set (docs/notebook/preregistration.md s.3-5), from finished runs:
one row per run with the collapse definition's parts and the quantities every run reports, the
evaluation noise of the cold start, and the dose figure (paired differences against the *cold
start's* mismatch at each rung, from ``benchmarks/dose_axis.py``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from stablerl import metrics as M
from stablerl.repro.experiments import EXPERIMENTS, reference_of
from stablerl.repro.stats import collapse_c3, collapse_preregistered, metric_mean, paired_interval, run_stats

Runs = dict[str, dict[int, tuple[dict, list[dict], int]]]  # variant -> seed -> (summary, rows, N)


def c3_reference_of(variant: str, c3_reference: str | None) -> str | None:
    """The run whose entropy C3 compares ``variant``'s with: the same rung's (the variant name's
    first part) ``c3_reference``, e.g. ``nvfp4/on_minirl`` for ``nvfp4/on_no_is`` and for
    ``nvfp4/n4/clip_r2``; none for the reference itself."""
    if c3_reference is None:
        return None
    rung = variant.split("/")[0] if "/" in variant else ""
    ref = f"{rung}/{c3_reference}" if rung else c3_reference
    return None if ref == variant else ref


def run_reading(rows: list[dict], n: int, aborted: bool, reference_rows: list[dict] | None) -> dict:
    """One run's pre-registered numbers beyond ``run_stats``'s (which holds C1, C2 and the old
    definition); steps are optimizer steps."""
    c3, direction = collapse_c3(rows, reference_rows, n) if reference_rows is not None else (None, "")
    step, how = collapse_preregistered(rows, reference_rows, aborted, n)
    return {
        "c3": c3,
        "c3_direction": direction,
        "prereg_step": step,
        "prereg_how": how,
        "kl_k1": metric_mean(rows, M.TRAIN_INFER_KL_K1),
        "staleness_kl": metric_mean(rows, M.STALENESS_KL),
        "clip_low": metric_mean(rows, "clip_frac_low"),
        "clip_high": metric_mean(rows, M.CLIP_FRAC_HIGH),
        "stale_agreement": metric_mean(rows, M.ROUTE_STALE),
        "seq_log_w": metric_mean(rows, "seq_log_w/mean"),
        "seq_log_w_p01": metric_mean(rows, M.SEQ_LOG_W_P01),
        "seq_log_w_p05": metric_mean(rows, "seq_log_w/p05"),
        "entropy": metric_mean(rows, M.ENTROPY),
    }


def readings(by_seed: Runs, c3_reference: str | None, pool: Runs | None = None) -> dict[str, dict[int, dict]]:
    """Per variant and seed, ``run_reading`` with ``run_stats``; C3's reference runs are looked up
    in ``pool`` (default: ``by_seed``; another experiment's runs where the reference lives there)."""
    pool = by_seed if pool is None else pool
    out: dict[str, dict[int, dict]] = {}
    for variant, runs in by_seed.items():
        ref_name = c3_reference_of(variant, c3_reference)
        for seed, (summary, rows, n) in runs.items():
            if summary.get("interrupted"):
                continue
            ref = pool.get(ref_name, {}).get(seed) if ref_name else None
            reading = run_reading(rows, n, bool(summary.get("aborted")), ref[1] if ref else None)
            reading.update(run_stats(summary, rows, n))
            reading["c3_reference"] = ref_name if ref else None
            out.setdefault(variant, {})[seed] = reading
    return out


def _step(step: int | None, how: str = "") -> str:
    return "-" if step is None else f"{step}" + (f" ({how})" if how else "")


def _g(x: float, fmt: str = ".2e") -> str:
    return "n/a" if x != x else format(x, fmt)


def readings_table(read: dict[str, dict[int, dict]], reference: str | dict[str, str] | None) -> str:
    """Markdown: one row per run; C3 is '-' where its reference run has not finished (then only C1
    decides). ``k1 KL / reference's``: the run's mean k1 KL over its reference's, same seed (for
    an R3 variant, 1 minus it is the share of the KL that R3 removes)."""

    head = [
        "variant",
        "seed",
        "acc step 0",
        "final acc",
        "peak acc",
        "C1",
        "C2",
        "C3 (vs)",
        "collapsed (pre-registered)",
        "collapsed (old definition)",
        "k1 KL",
        "k1 KL / reference's",
        "staleness KL",
        "clip low / high",
        "stale routing agreement",
        "seq log w mean / p05 / p01",
        "entropy",
        "KL spikes / opt step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, seeds in read.items():
        ref_name = reference_of(variant, reference) if reference else None
        for seed, r in sorted(seeds.items()):
            ref = read.get(ref_name, {}).get(seed) if ref_name else None
            ratio = f"{r['kl_k1'] / ref['kl_k1']:.2f}" if ref and ref["kl_k1"] > 0 else "-"
            c3 = "-" if r["c3_reference"] is None else _step(r["c3"], r["c3_direction"])
            lines.append(
                "| "
                + " | ".join(
                    [
                        variant,
                        str(seed),
                        _g(r["initial_acc"], ".3f"),
                        _g(r["final_acc"], ".3f"),
                        _g(r["peak_acc"], ".3f"),
                        _step(r["c1_step"]),
                        _step(r["c2_step"]),
                        c3,
                        _step(r["prereg_step"], r["prereg_how"]),
                        _step(r["collapse_step"], r["collapse_how"]),
                        _g(r["kl_k1"]),
                        ratio,
                        _g(r["staleness_kl"]),
                        f"{_g(r['clip_low'], '.1e')} / {_g(r['clip_high'], '.1e')}",
                        _g(r["stale_agreement"], ".4f"),
                        f"{_g(r['seq_log_w'], '.2f')} / {_g(r['seq_log_w_p05'], '.2f')} / "
                        f"{_g(r['seq_log_w_p01'], '.2f')}",
                        _g(r["entropy"], ".3f"),
                        _g(r["kl_spikes_per_opt_step"], ".3f"),
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def evaluation_noise(read: dict[str, dict[int, dict]]) -> tuple[dict[int, float], float | None]:
    """The cold start's step-0 held-out accuracy, which can only differ by evaluation noise (s.5):
    per seed, its spread (max - min) across variants — zero when, as in stablerl, evaluation
    samples with seeds drawn from the run's seed and step alone — and its spread across seeds (the
    mean over variants per seed; different sampling seeds, the same policy), None below 2 seeds."""
    by_seed: dict[int, list[float]] = {}
    for seeds in read.values():
        for seed, r in seeds.items():
            if r["initial_acc"] == r["initial_acc"]:
                by_seed.setdefault(seed, []).append(r["initial_acc"])
    per_seed = {s: max(v) - min(v) for s, v in sorted(by_seed.items()) if len(v) > 1}
    means = [statistics.mean(v) for v in by_seed.values()]
    return per_seed, (max(means) - min(means)) if len(means) > 1 else None


def noise_line(noise: tuple[dict[int, float], float | None]) -> str:
    per_seed, across = noise
    if not per_seed and across is None:
        return "Evaluation noise: fewer than two step-0 evaluations have finished; not measured yet.\n"
    parts = []
    if per_seed:
        parts.append(
            "across variants of one seed it spreads by "
            + ", ".join(f"{v:.3f} (seed {s})" for s, v in per_seed.items())
            + (" (the same evaluation seeds: no noise can show there)" if max(per_seed.values()) == 0 else "")
        )
    if across is not None:
        parts.append(f"across seeds (different sampling, the same policy) by {across:.3f}")
    worst = max([*per_seed.values(), across or 0.0])
    return (
        f"Evaluation noise (s.5): the cold start's step-0 held-out accuracy {'; '.join(parts)}. No difference "
        f"smaller than 3x the largest, {3 * worst:.3f}, is claimed.\n"
    )


def dose_points(read: dict[str, dict[int, dict]], reference: dict[str, str], dose_axis: dict[str, dict]) -> list[dict]:
    """Per rung and compared variant: the cold start's k1 KL at the rung (the axis), the paired
    final-accuracy differences against the variant's reference, their mean and 95% interval."""

    points = []
    for variant, seeds in read.items():
        rung, _, name = variant.rpartition("/")
        ref_name = reference_of(variant, reference)
        if not ref_name or rung not in dose_axis:
            continue
        ref = read.get(ref_name, {})
        diffs = [seeds[s]["final_acc"] - ref[s]["final_acc"] for s in sorted(set(seeds) & set(ref))]
        if not diffs:
            continue
        ci = paired_interval(diffs)
        points.append(
            {
                "rung": rung,
                "variant": name,
                "reference": ref_name.rpartition("/")[2],
                "dose_k1": dose_axis[rung]["kl_k1"],
                "seq_log_w": dose_axis[rung].get("seq_log_w_mean"),
                "diffs": diffs,
                "mean": statistics.mean(diffs),
                "lo": ci[1] if ci else None,
                "hi": ci[2] if ci else None,
            }
        )
    return points


def dose_markdown(points: list[dict]) -> str:
    lines = [
        "Against the dose (the cold start's k1 KL per token at each rung, dose_axis.json):\n",
        "| rung | cold start's k1 KL | cold start's sum log w / response | variant - reference | "
        "per-seed differences | mean | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (-p["dose_k1"], p["variant"])):
        ci = f"[{p['lo']:+.3f}, {p['hi']:+.3f}]" if p["lo"] is not None else "n/a (< 2 seeds)"
        seq = f"{p['seq_log_w']:+.2f}" if p["seq_log_w"] is not None else "n/a"
        lines.append(
            f"| {p['rung']} | {p['dose_k1']:.2e} | {seq} | {p['variant']} - {p['reference']} | "
            f"{', '.join(f'{d:+.3f}' for d in p['diffs'])} | {p['mean']:+.3f} | {ci} |"
        )
    return "\n".join(lines) + "\n"


# the dose figure's log axis starts here: a rung whose KL is at round-off (fp32: |k1| ~ 1e-9, either
# sign) is drawn at it, and labelled so
DOSE_AXIS_FLOOR = 1e-8


def plot_dose(points: list[dict], path: Path, title: str) -> Path:
    """Paired final-accuracy differences (mean, 95% interval where >= 2 seeds) against the cold
    start's per-token k1 KL at each rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, name in enumerate(dict.fromkeys(p["variant"] for p in points)):
        pts = sorted((p for p in points if p["variant"] == name), key=lambda p: p["dose_k1"])
        xs = [max(p["dose_k1"], DOSE_AXIS_FLOOR) for p in pts]
        ys = [p["mean"] for p in pts]
        err = [
            [(p["mean"] - p["lo"]) if p["lo"] is not None else 0 for p in pts],
            [(p["hi"] - p["mean"]) if p["hi"] is not None else 0 for p in pts],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=f"{name} - {pts[0]['reference']}")
        for p, x in zip(pts, xs):
            label = (
                p["rung"]
                if p["dose_k1"] >= DOSE_AXIS_FLOOR
                else f"{p['rung']} (KL {p['dose_k1']:.0e}, drawn at {DOSE_AXIS_FLOOR:.0e})"
            )
            ax.annotate(label, (x, p["mean"]), fontsize=7, textcoords="offset points", xytext=(3, 4))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("the cold start's training-inference KL at the rung (k1 per token, benchmarks/dose_axis.py)")
    ax.set_ylabel("final held-out accuracy, paired difference")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def write_reading(name: str, by_seed: Runs, dest: Path, pool: Runs | None = None) -> dict[str, Path]:
    """``readings.md`` (and the dose figure where ``dest/dose_axis.json`` exists) for an experiment
    marked ``"preregistered"``; ``pool`` holds C3's reference runs when they are another
    experiment's (``"c3_from"``)."""
    exp = EXPERIMENTS[name]
    read = readings(by_seed, exp.get("c3_reference"), pool)
    if not read:
        return {}
    paths = {"readings_md": dest / "readings.md"}
    text = (
        f"Pre-registered reading (docs/notebook/preregistration.md s.3-4), one row per finished run; steps are "
        f"optimizer steps.\n\n{noise_line(evaluation_noise(read))}\n{readings_table(read, exp.get('reference'))}"
    )
    axis_path = dest / "dose_axis.json"
    if isinstance(exp.get("reference"), dict) and axis_path.exists():
        measured = json.loads(axis_path.read_text())  # benchmarks/dose_axis.py --out: one entry per rung
        axis = {rung: v for rung, v in measured.items() if isinstance(v, dict) and "kl_k1" in v}
        points = dose_points(read, exp["reference"], axis)
        if points:
            paths["dose_png"] = plot_dose(points, dest / "dose.png", exp["title"])
            text += "\n" + dose_markdown(points)
    paths["readings_md"].write_text(text)
    return paths
