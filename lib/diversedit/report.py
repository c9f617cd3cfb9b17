"""The HTML report: tables, bar charts, in-pipeline gains, CKA heatmaps and training curves.

All logic of ``notebooks/report.py`` lives here; the notebook only calls and displays.
:func:`build_report` runs that notebook with papermill (``PLOTLY_RENDERER`` set so figures carry
their data as HTML) and converts it to one offline HTML page: code hidden, plotly.js inlined once,
no script loaded from a CDN.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from IPython.display import HTML
from plotly.io.base_renderers import NotebookRenderer
from plotly.subplots import make_subplots

from .files import atomic_write_bytes, environ
from .results import (
    TIERS,
    RowResult,
    aggregate,
    default_published_dir,
    load_all_published,
    metric_order,
    read_results,
    save_aggregate,
    table_id,
)
from .runner import KERNEL_ARGUMENTS, KERNEL_NAME

REPORT_NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "report.py"
REPORT_RENDERER_ENV = "plotly_mimetype+notebook"  # what build_report exports as PLOTLY_RENDERER
OFFLINE_RENDERER = "diversedit_offline"

BANNERS = {
    "smoke": "CPU smoke tier: digits data, FD_digits with a stand-in extractor — not comparable "
    "with the paper's ImageNet FID",
    "mini": "Mini tier: reduced models, training budget and sample count — not comparable with "
    "the paper's FID-50K",
    "paper_partial": "Paper tier: rows marked 'not comparable' were not evaluated with the real "
    "Inception on N = 50,000 samples",
    "paper_pending": "Paper tier: no result yet — every row is pending",
}
TIER_NOTES = {
    "smoke": "CPU, seconds to minutes: digits data, tiny models, stand-in feature extractor "
    "(FD_digits, …). Checks that the pipeline runs end to end.",
    "mini": "One GPU, hours: reduced models, budgets and sample counts. Shows trends only.",
    "paper": "The paper's setting: ImageNet 256, 400K iterations, FID-50K with the real Inception. "
    "Only these numbers are comparable with the published ones.",
}
_GREY, _PENDING = "color:#888888", "color:#888888;font-style:italic"
_TABLE_CSS = [
    {"selector": "th.row_heading", "props": [("white-space", "nowrap")]},
    {"selector": "td, th", "props": [("font-size", "12px"), ("padding", "2px 6px")]},
]
COLORS = {"published": "#4c72b0", "paper": "#dd8452", "mini": "#55a868", "smoke": "#8172b3"}


# --- plotly rendering ----------------------------------------------------------------------------


class OfflineNotebookRenderer(NotebookRenderer):
    """plotly's ``notebook`` renderer (plotly.js inlined once) minus its per-figure MathJax CDN
    script tag, so the HTML page loads nothing from the network."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        import plotly.io as pio

        html_div = pio.to_html(
            fig_dict,
            config=self.config,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=480,
            validate=False,
        )
        return {"text/html": html_div}


def configure_plotly() -> str:
    """Replace ``notebook`` in the default renderer (e.g. from ``PLOTLY_RENDERER``) by the offline
    variant; other renderers (e.g. ``plotly_mimetype`` for JupyterLab) stay. Returns the default."""
    import plotly.io as pio

    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = OfflineNotebookRenderer()
    names = [n for n in (pio.renderers.default or "").split("+") if n]
    names = [OFFLINE_RENDERER if n == "notebook" else n for n in names]
    if names:
        pio.renderers.default = "+".join(dict.fromkeys(names))
    return pio.renderers.default


# --- data ----------------------------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as they are; relative ones against ``$DIVERSEDIT_ROOT`` or the cwd."""
    p = Path(path)
    if p.is_absolute():
        return p
    return Path(os.environ.get("DIVERSEDIT_ROOT") or Path.cwd()) / p


@dataclass
class ReportData:
    results_dir: Path
    published_dir: Path
    published: dict[str, dict]
    results: list[RowResult]
    agg: pd.DataFrame


def load_report_data(
    results_dir: str | Path, published_dir: str | Path, params_dir: str | Path | None = None
) -> ReportData:
    """Published numbers, results and their aggregate. Every tier with row files
    (``<params_dir>/<stem>/<tier>/*.yaml``; ``params_dir`` defaults to the published directory's
    parent, i.e. ``params``) gets its rows, pending where no result exists yet."""
    rdir, pdir = resolve_path(results_dir), resolve_path(published_dir)
    params = resolve_path(params_dir) if params_dir is not None else pdir.parent
    agg = aggregate(rdir, pdir, params)
    results = read_results(rdir)
    idle = idle_diversity(results, rdir)
    keys = zip(agg["table"], agg["tier"], agg["row"], strict=True)
    agg["diversity_idle"] = [k in idle for k in keys]
    return ReportData(rdir, pdir, load_all_published(pdir), results, agg)


def idle_diversity(results: Sequence[RowResult], results_dir: Path) -> set[tuple[str, str, str]]:
    """``(table, tier, row)`` of the results whose run logged a diversity loss whose adaptive
    weight w(L_div) was 0 in every logged interval: the loss never acted on the model (e.g. one
    term at weight 1/3 that stays below ``adaptive_low``), so the row trained without it."""
    idle = set()
    for r in results:
        run = run_dirs_of(r, results_dir).get("")
        frame = trajectory_log(run) if run is not None else pd.DataFrame()
        if "div_weight" in frame.columns and (frame["div_weight"] == 0).all():
            idle.add((table_id(r.table), r.tier, r.row))
    return idle


def trajectory_log(run_dir: Path, _depth: int = 0) -> pd.DataFrame:
    """A run's ``log.jsonl`` (empty frame if none), preceded, when the run started from another
    run's checkpoint (``checkpoint.continue_shorter``: ``provenance.jsonl``'s first
    ``resumed_from``), by that run's records up to the step it started from."""
    log = run_dir / "log.jsonl"
    frame = read_log(log) if log.is_file() else pd.DataFrame()
    prov = run_dir / "provenance.jsonl"
    lines = prov.read_text().splitlines() if prov.is_file() else []
    first = json.loads(lines[0]) if lines else {}
    source = first.get("resumed_from")
    if not source or _depth > 8:
        return frame
    other = run_dir.parent / Path(source).parts[-3]  # <runs>/<run>/checkpoints/step_….pt
    if other == run_dir or not other.is_dir():
        return frame
    earlier = trajectory_log(other, _depth + 1)
    if earlier.empty:
        return frame
    earlier = earlier[earlier["step"] <= first.get("step", 0)]
    return pd.concat([earlier, frame], ignore_index=True).sort_values("step", kind="stable")


def _resolve_run_dir(path: str | Path | None, results_dir: Path) -> Path | None:
    if not path:
        return None
    p = Path(path)
    candidates = (
        [p] if p.is_absolute() else [resolve_path(p), results_dir.parent / p, results_dir / p]
    )
    return next((c for c in candidates if c.is_dir()), None)


def run_dirs_of(result: RowResult, results_dir: Path) -> dict[str, Path]:
    """The existing run directories of a result, by name: its ``run_dir`` ("" key) and those
    listed in ``metric_info["runs"]`` (``{name: {"run_dir": …}}``, e.g. the CKA figure's runs).
    Relative paths resolve against the repo root, the results directory's parent or itself."""
    named: dict[str, Any] = {"": result.run_dir}
    runs = result.metric_info.get("runs")
    if isinstance(runs, Mapping):
        named |= {str(k): v.get("run_dir") for k, v in runs.items() if isinstance(v, Mapping)}
    found = {k: _resolve_run_dir(v, results_dir) for k, v in named.items()}
    return {k: v for k, v in found.items() if v is not None}


# --- formatting ----------------------------------------------------------------------------------


def _fmt(v: float, metric: str, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    digits = 3 if metric.startswith(("Precision", "Recall")) else 2
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _metric_label(metric: str, paper_metric: str | None) -> str:
    if isinstance(paper_metric, str) and paper_metric != metric:
        return f"{metric} (paper: {paper_metric})"
    return metric


def _is_slug(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _primary_metric(sub: pd.DataFrame) -> str | None:
    fid = sub.loc[sub["paper_metric"] == "FID", "metric"]
    names = sorted(dict.fromkeys(fid) or dict.fromkeys(sub["metric"]), key=metric_order)
    return names[0] if names else None


def _tiers(sub: pd.DataFrame) -> list[str]:
    return [t for t in TIERS if t in set(sub["tier"])]


def _div(text: str, style: str, cls: str) -> HTML:
    return HTML(f'<div class="{cls}" style="{style}">{text}</div>')


def heading(text: str, level: int = 2, anchor: str | None = None) -> HTML:
    ident = f' id="{html.escape(anchor)}"' if anchor else ""
    return HTML(f"<h{level}{ident}>{html.escape(text)}</h{level}>")


def banner(agg: pd.DataFrame, table_id: str, tier: str) -> HTML | None:
    """The warning above a tier's table (None for a fully comparable paper tier)."""
    sub = agg[(agg["table"] == table_id) & (agg["tier"] == tier)]
    if tier == "paper":
        done = sub[sub["status"] != "pending"]
        if done.empty:
            text = BANNERS["paper_pending"]
        elif (~done["comparable"]).any():
            text = BANNERS["paper_partial"]
        else:
            return None
    else:
        text = BANNERS.get(tier, f"{tier} tier — not comparable with the paper's numbers")
    style = "border-left:6px solid #e0a800;background:#fff6d6;padding:8px 12px;margin:8px 0"
    return _div("⚠ " + html.escape(text, quote=False), style, "diversedit-banner")


# --- tables --------------------------------------------------------------------------------------


def table_frame(agg: pd.DataFrame, table_id: str, tier: str) -> pd.DataFrame:
    """Display strings: status, N, then per metric reproduced | published | Δ, then the gain of
    the primary metric over the row's own baseline. Pending cells read "pending", never 0."""
    sub = agg[(agg["table"] == table_id) & (agg["tier"] == tier)]
    metrics = sorted(dict.fromkeys(sub["metric"]), key=metric_order)
    # the gain column only where a row has a baseline (not for, e.g., the CKA figure)
    primary = _primary_metric(sub) if sub["baseline_row"].map(_is_slug).any() else None
    rows: dict[str, dict[tuple[str, str], str]] = {}
    labels: dict[str, str] = {}
    for r in sub.itertuples(index=False):
        labels[r.row] = r.label
        cells = rows.setdefault(r.row, {})
        not_comparable = tier == "paper" and r.status == "done" and not r.comparable
        state = f"{r.status}, not comparable" if not_comparable else r.status
        if getattr(r, "diversity_idle", False):
            state += ", diversity loss idle (w = 0 at every step)"
        cells[("", "status")] = state
        cells[("", "N")] = "—" if pd.isna(r.N) else f"{int(r.N):,}"
        col = _metric_label(r.metric, r.paper_metric)
        missing = math.isnan(r.reproduced)
        rep = r.status if missing and r.status != "done" else _fmt(r.reproduced, r.metric)
        status = r.published_status if isinstance(r.published_status, str) else None
        pub = status if status and math.isnan(r.published) else None
        cells[(col, "reproduced")] = rep
        cells[(col, "published")] = pub or _fmt(r.published, r.metric)
        cells[(col, "Δ")] = _fmt(r.delta, r.metric, signed=True)
        if r.metric == primary:
            gain = _fmt(r.gain_vs_baseline, r.metric, signed=True)
            has_baseline = _is_slug(r.baseline_row)
            cells[("gain vs baseline", r.metric)] = gain if has_baseline else "— (no baseline)"
    columns = [("", "status"), ("", "N")]
    for m in metrics:
        col = _metric_label(m, sub.loc[sub["metric"] == m, "paper_metric"].iloc[0])
        columns += [(col, "reproduced"), (col, "published"), (col, "Δ")]
    if primary:
        columns.append(("gain vs baseline", primary))
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).fillna("—")
    frame.columns = pd.MultiIndex.from_tuples(columns)
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    names = [f"{labels[r]} ({r})" if labels[r] in shared else labels[r] for r in frame.index]
    frame.index = pd.Index(names, name="row")  # unique: a shared label gets the row slug
    return frame


def styled_table(agg: pd.DataFrame, table_id: str, tier: str) -> pd.io.formats.style.Styler:
    """:func:`table_frame` styled: pending cells grey italic, Δ grey where not comparable."""
    frame = table_frame(agg, table_id, tier)

    def row_css(row: pd.Series) -> list[str]:
        grey = tier != "paper" or str(row[("", "status")]).endswith("not comparable")
        return [
            _PENDING
            if v in ("pending", "diverged", "diverges")
            else _GREY
            if grey and col[1] == "Δ"
            else ""
            for col, v in row.items()
        ]

    caption = f"{table_id} · {tier} tier"
    if tier != "paper":
        caption += " · no Δ: a different metric from the paper's, not comparable"
    return (
        frame.style.apply(row_css, axis=1)
        .set_table_styles(_TABLE_CSS)
        .set_caption(caption)
        .set_table_attributes(
            f'class="diversedit-table" data-table="{table_id}" data-tier="{tier}"'
        )
    )


def reference_table(doc: Mapping[str, Any]) -> pd.io.formats.style.Styler | None:
    """The published reference rows (other papers' numbers, not reproduced here), untruncated."""
    refs = [r for r in doc["rows"] if r["kind"] == "reference"]
    if not refs:
        return None
    metrics = sorted({m for r in refs for m in r["metrics"]}, key=metric_order)
    frame = pd.DataFrame(
        [
            {"row": r["label"], **{m: _fmt(r["metrics"].get(m, math.nan), m) for m in metrics}}
            | {"source": r["source"], "note": r["note"] or ""}
            for r in refs
        ]
    ).set_index("row")
    return frame.style.set_caption(f"{doc['table']} · published elsewhere").set_table_attributes(
        f'class="diversedit-table" data-table="{doc["table"]}" data-tier="reference"'
    )


# --- figures -------------------------------------------------------------------------------------


def _bar(name: str, frame: pd.DataFrame, column: str, color: str) -> go.Bar:
    return go.Bar(name=name, x=list(frame["label"]), y=list(frame[column]), marker_color=color)


def _panels(
    agg: pd.DataFrame, table_id: str, value: str, published_value: str, what: str = ""
) -> list[tuple[str, list[go.Bar]]]:
    """One panel per metric scale: the published FID with the comparable paper-tier values, then
    one panel per tier whose values are not on the paper's scale (never mixed on one axis).

    Panel titles name the table, what is plotted (``what``, e.g. " gain over baseline"), the
    metric and the tiers actually shown (the paper tier only when it has comparable values)."""
    sub = agg[agg["table"] == table_id]
    panels = []
    paper = sub[(sub["tier"] == "paper") & (sub["paper_metric"] == "FID")]
    pub = paper.drop_duplicates("row").dropna(subset=[published_value])
    ok = paper[paper["comparable"]].dropna(subset=[value])
    if not pub.empty or not ok.empty:
        bars = [_bar(f"published{what} (FID)", pub, published_value, COLORS["published"])]
        shown = "published"
        if not ok.empty:
            bars.append(_bar(f"reproduced{what} (paper tier, FID)", ok, value, COLORS["paper"]))
            shown = "published vs paper tier"
        panels.append((f"{table_id} · FID{what}:<br>{shown}", bars))
    for tier in _tiers(sub):
        tsub = sub[sub["tier"] == tier]
        tsub = tsub[~tsub["comparable"]] if tier == "paper" else tsub
        if tsub.empty:
            continue
        metric = _primary_metric(tsub)
        rep = tsub[tsub["metric"] == metric].dropna(subset=[value])
        if not rep.empty:
            bars = [_bar(f"{tier}: {metric}", rep, value, COLORS.get(tier, "#937860"))]
            title = f"{table_id} · {metric}{what}:<br>{tier} tier (not comparable)"
            panels.append((title, bars))
    return panels


def _subplots(panels: list[tuple[str, list[go.Bar]]], title: str, ytitle: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels])
    for i, (_, bars) in enumerate(panels, start=1):
        for bar in bars:
            fig.add_trace(bar, row=1, col=i)
        fig.update_yaxes(title_text=ytitle if i == 1 else None, row=1, col=i)
    # the legend sits right of the plots, clear of the rotated row labels under the x axes
    fig.update_xaxes(tickangle=-45, automargin=True)
    fig.update_layout(
        title=title,
        barmode="group",
        height=520,
        legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top"},
        margin={"t": 110},
    )
    return fig


def comparison_figure(agg: pd.DataFrame, table_id: str) -> go.Figure | None:
    """Bar chart of reproduced vs published (FID and each tier's FID-like metric)."""
    panels = _panels(agg, table_id, "reproduced", "published")
    if not panels:
        return None
    return _subplots(panels, f"{table_id}: reproduced vs published", "value (lower is better)")


def gain_figure(agg: pd.DataFrame, table_id: str) -> go.Figure | None:
    """In-pipeline gain (row − its own baseline row, same tier) next to the published gain."""
    sub = agg[(agg["table"] == table_id) & agg["baseline_row"].notna()]
    panels = _panels(sub, table_id, "gain_vs_baseline", "published_gain", " gain over baseline")
    if not panels:
        return None
    return _subplots(
        panels,
        f"{table_id}: gain over each row's own baseline (negative FID/FD = better)",
        "Δ vs baseline",
    )


_CKA = re.compile(r"^step_(\d+)\.npy$")


def load_cka(run_dir: str | Path) -> list[tuple[int, np.ndarray]]:
    """``(step, (L, L) matrix)`` from ``<run_dir>/cka/step_XXXXXXXX.npy``, by step."""
    out = []
    for p in Path(run_dir, "cka").glob("step_*.npy"):
        m = _CKA.match(p.name)
        if not m:
            continue
        a = np.load(p, allow_pickle=False)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"{p}: CKA matrix must be (L, L), got {a.shape}")
        out.append((int(m.group(1)), a.astype(np.float64)))
    return sorted(out, key=lambda t: t[0])


def cka_heatmap(mat: np.ndarray, **trace: Any) -> go.Heatmap:
    """One (L, L) block × block CKA matrix as a heatmap on [0, 1], blocks numbered from 1."""
    blocks = list(range(1, mat.shape[0] + 1))
    hover = "block %{y} vs %{x}: %{z:.3f}<extra></extra>"
    return go.Heatmap(
        z=mat.tolist(), x=blocks, y=blocks, zmin=0.0, zmax=1.0, colorscale="Viridis",
        hovertemplate=hover, **trace,
    )  # fmt: skip


def cka_figure(
    snapshots: Sequence[tuple[int, np.ndarray]], title: str, max_steps: int = 20
) -> go.Figure | None:
    """Block × block CKA heatmap with a slider over training steps (last step shown first)."""
    if not snapshots:
        return None
    idx = np.unique(np.linspace(0, len(snapshots) - 1, min(max_steps, len(snapshots))).round())
    chosen = [snapshots[int(i)] for i in idx]
    fig = go.Figure()
    for k, (step, mat) in enumerate(chosen):
        fig.add_trace(
            cka_heatmap(
                mat, visible=k == len(chosen) - 1, name=f"step {step}", colorbar={"title": "CKA"}
            )
        )
    steps = [
        {
            "label": str(step),
            "method": "update",
            "args": [{"visible": [j == k for j in range(len(chosen))]}],
        }
        for k, (step, _) in enumerate(chosen)
    ]
    n_blocks = max(m.shape[0] for _, m in chosen)
    ticks = {"tickmode": "linear", "tick0": 1, "dtick": max(1, math.ceil(n_blocks / 16))}
    layout = {
        "title": title,
        "xaxis": {"title": {"text": "block"}, **ticks},
        "yaxis": {"title": {"text": "block"}, "autorange": "reversed", **ticks},
        "height": 520,
        "width": 600,
    }
    fig.update_layout(**layout)
    if len(chosen) > 1:
        fig.update_layout(
            sliders=[
                {"active": len(chosen) - 1, "currentvalue": {"prefix": "step "}, "steps": steps}
            ]
        )
    return fig


def read_log(path: str | Path) -> pd.DataFrame:
    """``log.jsonl`` (one JSON object per line with "step" and loss terms) as a frame by step."""
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # torn by a kill while the run wrote it
                continue
            raise
        if "step" not in rec:
            raise ValueError(f"{path}:{i}: a log record needs 'step'")
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    # a step logged twice (a run killed after logging it, before resuming): its last record
    frame = frame.drop_duplicates("step", keep="last")
    return frame.sort_values("step").reset_index(drop=True)


def training_figure(logs: Mapping[str, pd.DataFrame], title: str) -> go.Figure | None:
    """Loss curves of several runs; a menu switches between the logged terms ("loss" first)."""
    skip = {"step", "images_per_s"}
    terms: list[str] = []
    for frame in logs.values():
        for c in frame.columns:
            if c not in skip and c not in terms and pd.api.types.is_numeric_dtype(frame[c]):
                terms.append(c)
    terms.sort(key=lambda t: (t != "loss", t))
    if not terms:
        return None
    fig, owners = go.Figure(), []
    for term in terms:
        for label, frame in logs.items():
            if term in frame.columns:
                d = frame[["step", term]].dropna()
                fig.add_trace(
                    go.Scatter(
                        x=list(d["step"]),
                        y=list(d[term]),
                        mode="lines",
                        name=label,
                        visible=term == terms[0],
                        legendgroup=label,
                    )
                )
                owners.append(term)
    buttons = [
        {
            "label": term,
            "method": "update",
            "args": [
                {"visible": [o == term for o in owners]},
                {"yaxis": {"title": {"text": term}}},
            ],
        }
        for term in terms
    ]
    fig.update_layout(
        title=title,
        xaxis_title="training step",
        yaxis_title=terms[0],
        height=420,
        updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15, "xanchor": "right"}],
    )
    return fig


# --- sections (what the notebook displays) -------------------------------------------------------


def overview(data: ReportData) -> list[Any]:
    """Intro: where the numbers come from, the tiers, and done/pending counts per table."""
    agg = data.agg
    counts = (
        agg.drop_duplicates(["table", "tier", "row"])
        .assign(done=lambda d: d["status"] != "pending")
        .groupby(["table", "tier"], sort=False)["done"]
        .agg(lambda s: f"{int(s.sum())} / {len(s)}")
        .unstack("tier")
        .fillna("—")
    )
    notes = "".join(f"<li><b>{t}</b>: {html.escape(n)}</li>" for t, n in TIER_NOTES.items())
    intro = (
        f"<p>Results: <code>{html.escape(str(data.results_dir))}</code> "
        f"({len(data.results)} result files); published numbers: "
        f"<code>{html.escape(str(data.published_dir))}</code>.</p><ul>{notes}</ul>"
        "<p>Rows done / rows expected per table and tier:</p>"
    )
    return [HTML(intro), counts]


def table_section(data: ReportData, table_id: str) -> list[Any]:
    """Heading, per-tier banner + table, comparison and gain charts, reference numbers."""
    doc = data.published.get(table_id)
    title = f"{table_id} — {doc['title']}" if doc else f"{table_id} (no published numbers)"
    items: list[Any] = [heading(title, 2, anchor=table_id)]
    if doc:
        setting = ", ".join(f"{k}: {v}" for k, v in doc["setting"].items() if k != "note")
        items.append(
            HTML(
                f"<p><i>Source:</i> {html.escape(doc['source'])}<br><i>Setting:</i> "
                f"{html.escape(setting)}</p>"
            )
        )
    sub = data.agg[data.agg["table"] == table_id]
    for tier in _tiers(sub):
        items.append(heading(f"{table_id} · {tier} tier", 3))
        note = banner(data.agg, table_id, tier)
        if note is not None:
            items.append(note)
        table_html = styled_table(data.agg, table_id, tier).to_html()
        items.append(HTML(f'<div style="overflow-x:auto">{table_html}</div>'))
    for fig in (comparison_figure(data.agg, table_id), gain_figure(data.agg, table_id)):
        if fig is not None:
            items.append(fig)
    refs = reference_table(doc) if doc else None
    if refs is not None:
        items += [
            heading(f"{table_id} · reference numbers (other papers; not reproduced)", 3),
            refs,
        ]
    return items


def table_sections(data: ReportData) -> Iterator[Any]:
    """Every table's section; figures (e.g. f01) are left to :func:`cka_section`."""
    ids = [t for t, d in data.published.items() if d["kind"] == "table"]
    ids += sorted(set(data.agg["table"]) - set(data.published))
    for tid in ids:
        yield from table_section(data, tid)


def _label(data: ReportData, result: RowResult) -> str:
    """The published label of a result's row (the result's own label for unpublished rows)."""
    doc = data.published.get(table_id(result.table))
    rows = {r["row"]: r["label"] for r in doc["rows"]} if doc else {}
    return rows.get(result.row, result.label)


def _runs(data: ReportData) -> list[tuple[RowResult, str, Path]]:
    """``(result, display label, run dir)`` for every distinct run directory of each table and
    tier's results (a run shared by two tables, e.g. REPA-B in t04 and f01, is in both)."""
    out, seen = [], set()
    for r in data.results:
        for name, d in run_dirs_of(r, data.results_dir).items():
            key = (table_id(r.table), r.tier, d.resolve())
            if key not in seen:
                seen.add(key)
                label = _label(data, r) + (f" · {name}" if name else "")
                out.append((r, label, d))
    return out


def cka_section(data: ReportData, max_runs: int = 12) -> list[Any]:
    """The CKA figure description and one heatmap per run directory holding snapshots."""
    doc = next((d for d in data.published.values() if d["kind"] == "figure"), None)
    items: list[Any] = []
    if doc:
        items += [
            heading(f"{doc['table']} — {doc['title']}", 2, anchor=doc["table"]),
            HTML(
                f"<p>{html.escape(doc['description'])}</p><p><i>Source:</i> "
                f"{html.escape(doc['source'])}</p>"
            ),
        ]
    sub = data.agg[data.agg["table"] == doc["table"]] if doc else data.agg.iloc[:0]
    for tier in _tiers(sub):
        table_html = styled_table(data.agg, doc["table"], tier).to_html()
        items.append(HTML(f'<div style="overflow-x:auto">{table_html}</div>'))
    figs, shown = 0, set()
    for r, label, d in _runs(data):
        snaps = load_cka(d) if d.resolve() not in shown else []
        if snaps and figs < max_runs:
            shown.add(d.resolve())
            title = f"CKA — {table_id(r.table)} · {label}<br><sup>{r.tier} tier</sup>"
            items.append(cka_figure(snaps, title))
            figs += 1
    if figs == 0:
        items.append(HTML("<p>No CKA snapshots (run_dir/cka/step_*.npy) in the results.</p>"))
    return items


def training_section(data: ReportData) -> list[Any]:
    """One loss-curve figure per (table, tier) over the runs that have a ``log.jsonl``."""
    groups: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
    for r, label, d in _runs(data):
        frame = trajectory_log(d)
        if not frame.empty:
            groups.setdefault((table_id(r.table), r.tier), {})[label] = frame
    items: list[Any] = [heading("Training curves", 2, anchor="training")]
    for (table, tier), logs in sorted(groups.items()):
        fig = training_figure(logs, f"{table} · {tier} tier: training losses")
        if fig is not None:
            items.append(fig)
    if not groups:
        items.append(HTML("<p>No training logs (run_dir/log.jsonl) in the results.</p>"))
    return items


# --- building the page ---------------------------------------------------------------------------

_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]+", re.I)


def report_kernel() -> str:
    """``diversedit`` when such a kernel is registered, else ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def export_html(executed: str | Path, title: str = "DiverseDiT reproduction report") -> str:
    """An executed notebook as one offline HTML page (lab template, code cells hidden, no CDN
    scripts: require.js, MathJax and mermaid are dropped)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = nbformat.read(str(executed), as_version=4)
    nb.metadata["title"] = title
    bare = [
        i
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if "application/vnd.plotly.v1+json" in out.get("data", {})
        and "text/html" not in out.get("data", {})
    ]
    if bare:
        raise RuntimeError(
            f"cells {sorted(set(bare))} hold plotly figures without HTML (blank in the page): "
            f"run with PLOTLY_RENDERER={REPORT_RENDERER_ENV!r} and report.configure_plotly()"
        )
    exporter = HTMLExporter(
        template_name="lab",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    exporter.raw_template = _TEMPLATE
    exporter.register_preprocessor(
        TagRemovePreprocessor(remove_cell_tags={"injected-parameters", "parameters"}),
        enabled=True,
    )
    body, _ = exporter.from_notebook_node(nb)
    cdn = _CDN_SCRIPT.findall(body)
    if cdn:
        raise RuntimeError(f"the report would load scripts from the network: {cdn[:3]}")
    return body


def build_report(
    results_dir: str | Path,
    published_dir: str | Path | None = None,
    out_html: str | Path | None = None,
    *,
    notebook: str | Path | None = None,
    kernel_name: str | None = None,
    cell_timeout: int = 600,
) -> Path:
    """Aggregate, execute ``notebooks/report.py`` with papermill and write the HTML page.

    Writes ``<results_dir>/aggregate.{csv,parquet}``, the executed notebook next to the page
    (``report.ipynb``) and the page itself (default ``<results_dir>/report/index.html``)."""
    import jupytext
    import papermill as pm

    rdir = Path(results_dir).resolve()
    pdir = Path(published_dir if published_dir is not None else default_published_dir()).resolve()
    out = Path(out_html) if out_html is not None else rdir / "report" / "index.html"
    nb_path = Path(notebook) if notebook is not None else REPORT_NOTEBOOK
    if not nb_path.is_file():
        raise FileNotFoundError(f"report notebook {nb_path} not found")
    root = nb_path.resolve().parents[1]
    save_aggregate(load_report_data(rdir, pdir).agg, rdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    executed = out.with_name("report.ipynb")
    with tempfile.TemporaryDirectory(prefix="diversedit-report-") as tmp:
        src = Path(tmp) / "report.ipynb"
        jupytext.write(jupytext.read(nb_path), src, fmt="ipynb")
        with environ({"PLOTLY_RENDERER": REPORT_RENDERER_ENV, "DIVERSEDIT_ROOT": str(root)}):
            pm.execute_notebook(
                str(src),
                str(executed),
                parameters={"results_dir": str(rdir), "published_dir": str(pdir)},
                kernel_name=kernel_name or report_kernel(),
                cwd=str(root),
                progress_bar=False,
                start_timeout=120,
                execution_timeout=cell_timeout,
                extra_arguments=KERNEL_ARGUMENTS,
            )
    atomic_write_bytes(out, export_html(executed).encode())
    return out
