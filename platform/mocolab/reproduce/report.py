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
from mocolab.reproduce.evidence import CheckResult, FinishResult  # noqa: E402

VERDICT_TEXT = {"reproduced": "reproduced", "not_reproduced": "**not reproduced**", "inconclusive": "inconclusive"}
METRIC_LABELS = {
    "knn_top1": "kNN top-1",
    "lincls_fast_top1": "linear probe top-1",
    "det_AP": "AP",
    "det_AP50": "AP50",
    "det_AP75": "AP75",
}
"""The accuracy columns of the tables, in order (a column appears when some run of the claim logged it)."""


@dataclass
class ClaimReport:
    """What the report shows of one claim."""

    claim: Claim
    sweep: str  # the claim's sweep name (its MLflow run)
    table: pd.DataFrame  # evidence.rows_table
    baseline: pd.DataFrame  # the random-init encoder's metrics (columns) by seed (index)
    results: list[CheckResult | FinishResult]
    verdict: str
    curves: pd.DataFrame  # columns setting, seed, step, value: per-epoch training loss
    figure: str | None = None  # PNG file name in the report folder

    @property
    def metrics(self) -> list[str]:
        """The accuracy metrics the claim's runs logged, in :data:`METRIC_LABELS`' order."""
        return [m for m in METRIC_LABELS if f"{m}_mean" in self.table and self.table[f"{m}_mean"].notna().any()]

    @property
    def verdict_metrics(self) -> list[str]:
        """The metrics the claim's checks decide on."""
        return list(dict.fromkeys(self.claim.metric_of(check) for check in self.claim.checks))

    def baseline_text(self, metric: str, with_n: bool = False) -> str:
        """The random-init level of ``metric``: ``46.4 ± 1.4`` (``(n)`` appended with ``with_n``); ``-`` if none."""
        values = self.baseline[metric].dropna() if metric in self.baseline else pd.Series(dtype=float)
        if values.empty:
            return "-"
        text = mean_std(values.mean(), values.std() if len(values) > 1 else float("nan"))
        return f"{text} ({len(values)})" if with_n else text


def plot_claim(report: ClaimReport, path: Path) -> Path:
    """The final value of the verdict's first accuracy metric per setting (mean ± std over seeds, the random-init
    level dashed) beside the mean training loss per epoch of each setting (thin lines: single seeds)."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    table = report.table
    shown = [m for m in report.verdict_metrics if m in report.metrics] or report.metrics or ["knn_top1"]
    metric = shown[0]
    positions = list(range(len(table)))
    acc.errorbar(positions, table[f"{metric}_mean"], yerr=table[f"{metric}_std"].fillna(0), fmt="o", capsize=4)
    if metric in report.baseline and report.baseline[metric].notna().any():
        acc.axhline(report.baseline[metric].mean(), color="grey", linestyle="--", label="random init")
        acc.legend(fontsize="small")
    labels = [_short(s) for s in table["setting"]]
    acc.set_xticks(
        positions,
        labels,
        rotation=20 if max(map(len, labels)) > 8 else 0,
        ha="right" if max(map(len, labels)) > 8 else "center",
        fontsize="small",
    )
    acc.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%), final")
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


def _column(report: ClaimReport, metric: str) -> str:
    mark = " (verdict)" if metric in report.verdict_metrics else ""
    return f"{METRIC_LABELS[metric]}{mark}"


def rows_markdown(report: ClaimReport) -> str:
    """The claim's table: setting, the paper's number, each accuracy metric its runs logged and the final loss
    (mean ± std), n; the random-init encoder's row last."""
    t = report.table
    columns = {"setting": list(t["setting"]), "paper": [_paper_text(v) for v in t["paper"]]}
    for metric in report.metrics:
        columns[_column(report, metric)] = [mean_std(m, s) for m, s in zip(t[f"{metric}_mean"], t[f"{metric}_std"])]
    columns["final loss"] = [mean_std(m, s, 2) for m, s in zip(t["loss_mean"], t["loss_std"])]
    columns["n"] = [str(int(n)) for n in t["n"]]
    frame = pd.DataFrame(columns)
    if len(report.baseline):
        init = {"setting": "random init (same seeds)", "paper": "-", "final loss": "-", "n": str(len(report.baseline))}
        init.update({_column(report, m): report.baseline_text(m) for m in report.metrics})
        frame = pd.concat([frame, pd.DataFrame([init])], ignore_index=True)
    return to_markdown(frame)


def checks_markdown(results: Sequence[CheckResult | FinishResult]) -> str:
    """One line per check: what it compares, the mean paired difference with its interval, n, the seeds that
    would resolve it with 80 % power (at the check's ``effect``, else the observed difference), verdict; the finish
    check: how many runs finished, naming each that did not and why."""
    level = round(100 * (1 - 2 * ALPHA))
    rows = []
    for r in results:
        if isinstance(r, FinishResult):
            rows.append(
                {
                    "check": r.name,
                    "comparison": r.text,
                    "metric": r.metric,
                    f"a - b, mean [{level}% CI]": "-",
                    "n": len(r.outcomes),
                    "seeds for 80% power": "-",
                    "verdict": VERDICT_TEXT[r.verdict],
                }
            )
            continue
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
                "seeds for 80% power": _seeds_text(r),
                "verdict": VERDICT_TEXT[r.verdict] + (" (diagnostic)" if r.check.role == "diagnostic" else ""),
            }
        )
    return to_markdown(pd.DataFrame(rows))


def _seeds_text(result: CheckResult) -> str:
    if result.interval is None or not result.interval.defined:
        return "-"
    needed = result.seeds_needed
    return "> 1000" if needed is None else str(needed)


def claim_markdown(report: ClaimReport) -> str:
    """The section of one claim."""
    claim = report.claim
    lines = [
        f"## {claim.title} (`{claim.claim}`): {VERDICT_TEXT[report.verdict]}",
        "",
        f"Paper: {claim.paper.source}. Sweep: `{report.sweep}`. Verdict metric: "
        f"{', '.join(METRIC_LABELS.get(m, m) for m in report.verdict_metrics)}.",
        "",
        rows_markdown(report),
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
    """One line per setting of every claim: the paper's number, ours (kNN top-1, linear probe and, for a
    detection claim, AP: mean ± std (n)), the metric the verdict uses and the claim's verdict."""
    knn, probe = "ours: kNN top-1", "ours: linear probe top-1"
    rows = []
    for rep in reports:
        main = [m for m in rep.verdict_metrics if m.startswith("det_")][:1]  # a detection claim's AP column
        for i, (_, row) in enumerate(rep.table.iterrows()):
            cells = {
                knn: _summary_cell(row, "knn_top1"),
                probe: _summary_cell(row, "lincls_fast_top1"),
                "ours: AP": _summary_cell(row, main[0]) if main else "-",
            }
            rows.append(
                {
                    "claim": rep.claim.claim if i == 0 else "",
                    "setting": row["setting"],
                    "paper": _paper_text(row["paper"]),
                    **cells,
                    "verdict on": ", ".join(METRIC_LABELS.get(m, m) for m in rep.verdict_metrics) if i == 0 else "",
                    "verdict": VERDICT_TEXT[rep.verdict] if i == 0 else "",
                }
            )
        if len(rep.baseline):
            rows.append(
                {
                    "claim": "",
                    "setting": "random init",
                    "paper": "-",
                    knn: rep.baseline_text("knn_top1", with_n=True),
                    probe: rep.baseline_text("lincls_fast_top1", with_n=True),
                    "ours: AP": rep.baseline_text(main[0], with_n=True) if main else "-",
                    "verdict on": "",
                    "verdict": "",
                }
            )
    frame = pd.DataFrame(rows)
    empty = [c for c in (probe, "ours: AP") if (frame[c] == "-").all()]
    return to_markdown(frame.drop(columns=empty))


def _summary_cell(row: pd.Series, metric: str) -> str:
    mean, std = row.get(f"{metric}_mean", float("nan")), row.get(f"{metric}_std", float("nan"))
    return "-" if pd.isna(mean) else f"{mean_std(mean, std)} ({int(row['n'])})"


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
