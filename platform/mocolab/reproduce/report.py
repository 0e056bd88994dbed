"""The reproduction report: one markdown file and one PNG per claim (final accuracy per setting with error bars
beside the training-loss curves), from the claims' tables and check results. No MLflow here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mocolab.analysis.plots import save_figure  # noqa: E402
from mocolab.analysis.tables import mean_std, to_markdown  # noqa: E402
from mocolab.analysis.verdict import ALPHA  # noqa: E402
from mocolab.reproduce.claims import Claim  # noqa: E402
from mocolab.reproduce.evidence import CheckResult  # noqa: E402

VERDICT_TEXT = {"reproduced": "reproduced", "not_reproduced": "**not reproduced**", "inconclusive": "inconclusive"}


@dataclass
class ClaimReport:
    """What the report shows of one claim."""

    claim: Claim
    sweep: str  # the claim's sweep name (its MLflow run)
    table: pd.DataFrame  # evidence.rows_table
    baseline: pd.Series  # random-init kNN top-1 by seed
    results: list[CheckResult]
    verdict: str
    curves: pd.DataFrame  # columns setting, seed, step, value: per-epoch training loss
    figure: str | None = None  # PNG file name in the report folder


def plot_claim(report: ClaimReport, path: Path) -> Path:
    """Final kNN top-1 per setting (mean ± std over seeds, the random-init level dashed) beside the mean
    training loss per epoch of each setting (thin lines: single seeds)."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    table = report.table
    positions = list(range(len(table)))
    acc.errorbar(positions, table["knn_top1_mean"], yerr=table["knn_top1_std"].fillna(0), fmt="o", capsize=4)
    if len(report.baseline):
        acc.axhline(report.baseline.mean(), color="grey", linestyle="--", label="random init")
        acc.legend(fontsize="small")
    labels = [_short(s) for s in table["setting"]]
    acc.set_xticks(
        positions,
        labels,
        rotation=20 if max(map(len, labels)) > 8 else 0,
        ha="right" if max(map(len, labels)) > 8 else "center",
        fontsize="small",
    )
    acc.set_ylabel("kNN top-1 (%), final epoch")
    acc.set_title(report.claim.claim)
    acc.grid(alpha=0.3)
    for i, (setting, rows) in enumerate(report.curves.groupby("setting", sort=False)):
        color = f"C{i % 10}"
        for _, seed_rows in rows.groupby("seed"):
            loss.plot(seed_rows["step"], seed_rows["value"], color=color, alpha=0.25, linewidth=0.8)
        mean = rows.groupby("step")["value"].mean()
        loss.plot(mean.index, mean.to_numpy(), color=color, label=_short(setting))
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss.set_xlabel("epoch")
    loss.set_ylabel("training loss (InfoNCE)")
    if not report.curves.empty:
        loss.legend(fontsize="small")
    loss.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)


def _short(setting: str) -> str:
    """A setting label without the section prefixes of its keys: ``momentum=0.9``."""
    parts = (part.partition("=") for part in setting.split(", "))
    return ", ".join(key.split(".")[-1] + sep + value for key, sep, value in parts)


def _paper_text(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def rows_markdown(report: ClaimReport) -> str:
    """The claim's table: setting, the paper's number, our kNN top-1 and final loss (mean ± std, n)."""
    t = report.table
    frame = pd.DataFrame(
        {
            "setting": t["setting"],
            "paper": [_paper_text(v) for v in t["paper"]],
            "kNN top-1 (ours)": [mean_std(m, s) for m, s in zip(t["knn_top1_mean"], t["knn_top1_std"])],
            "final loss": [mean_std(m, s, 2) for m, s in zip(t["loss_mean"], t["loss_std"])],
            "n": t["n"].astype(int),
        }
    )
    return to_markdown(frame)


def checks_markdown(results: Sequence[CheckResult]) -> str:
    """One line per check: what it compares, the mean paired difference with its interval, n, verdict."""
    level = round(100 * (1 - 2 * ALPHA))
    rows = []
    for r in results:
        iv = r.interval
        if iv is None:
            diff = "no paired seeds"
        elif iv.defined:
            diff = f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]"
        else:
            diff = f"{iv.mean:+.2f} (one seed: no interval)"
        rows.append(
            {
                "check": r.check.name,
                "comparison": r.text,
                "metric": r.metric,
                f"a - b, mean [{level}% CI]": diff,
                "n": iv.n if iv else 0,
                "verdict": VERDICT_TEXT[r.verdict],
            }
        )
    return to_markdown(pd.DataFrame(rows))


def claim_markdown(report: ClaimReport) -> str:
    """The section of one claim."""
    claim = report.claim
    baseline = report.baseline
    lines = [
        f"## {claim.title} (`{claim.claim}`): {VERDICT_TEXT[report.verdict]}",
        "",
        f"Paper: {claim.paper.source}. Sweep: `{report.sweep}`.",
        "",
        rows_markdown(report),
        "",
        "Random init (same seeds): kNN top-1 "
        f"{mean_std(baseline.mean(), baseline.std() if len(baseline) > 1 else float('nan'))}"
        f" (n={len(baseline)}).",
        "",
        checks_markdown(report.results),
        "",
        f"**How the setting departs from the paper's.** {claim.departures.strip()}",
        "",
        f"**How the task and settings were chosen.** {claim.chosen.strip()}",
        "",
    ]
    if report.figure:
        lines += [f"![{claim.claim}]({report.figure})", ""]
    return "\n".join(lines)


def summary_markdown(reports: Sequence[ClaimReport]) -> str:
    """One line per setting of every claim: the paper's number, ours, and the claim's verdict."""
    rows = []
    for rep in reports:
        for i, (_, row) in enumerate(rep.table.iterrows()):
            rows.append(
                {
                    "claim": rep.claim.claim if i == 0 else "",
                    "setting": row["setting"],
                    "paper": _paper_text(row["paper"]),
                    "ours: kNN top-1 (mean ± std, n)": (
                        f"{mean_std(row['knn_top1_mean'], row['knn_top1_std'])} ({int(row['n'])})"
                    ),
                    "verdict": VERDICT_TEXT[rep.verdict] if i == 0 else "",
                }
            )
        if len(rep.baseline):
            b = rep.baseline
            rows.append(
                {
                    "claim": "",
                    "setting": "random init",
                    "paper": "-",
                    "ours: kNN top-1 (mean ± std, n)": (
                        f"{mean_std(b.mean(), b.std() if len(b) > 1 else float('nan'))} ({len(b)})"
                    ),
                    "verdict": "",
                }
            )
    return to_markdown(pd.DataFrame(rows))


def write_report(reports: Sequence[ClaimReport], out: Path, header: str, appendix: str = "") -> Path:
    """``report.md`` (``header``, the summary table, one section per claim, ``appendix``) and each claim's PNG
    in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for rep in reports:
        rep.figure = plot_claim(rep, out / f"{rep.claim.claim}.png").name
    text = "\n".join(
        [header.strip(), "", "## Summary", "", summary_markdown(reports), ""]
        + [claim_markdown(rep) for rep in reports]
        + [appendix.strip(), ""]
    )
    path = out / "report.md"
    path.write_text(text)
    return path
