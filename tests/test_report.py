"""Published numbers, the results-file schema, aggregation and the HTML report.

One report build per module (kernel start ≈ 10 s); everything else runs without a kernel.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from diversedit.results import (
    PAPER_METRICS,
    PublishedError,
    RowResult,
    aggregate,
    load_all_published,
    load_published,
    paper_metric,
    read_results,
    save_aggregate,
    validate_published,
    write_result,
)


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# pandas/pyarrow and the report stack come with the package's "notebooks" extra.
needs_pandas = pytest.mark.skipif(
    not _has("pandas", "pyarrow"), reason="needs pandas + pyarrow (extra 'notebooks')"
)
needs_report = pytest.mark.skipif(
    not _has("pandas", "pyarrow", "plotly", "IPython", "papermill", "nbconvert", "jupytext"),
    reason="needs the report stack (extra 'notebooks')",
)
REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "params" / "published"
CHROMIUM = Path("/usr/bin/chromium")
SMOKE_BANNER = (
    "CPU smoke tier: digits data, FD_digits with a stand-in extractor — not comparable with the "
    "paper's ImageNet FID"
)

# Every DiverseDiT number of paper-summary.md, typed in again by hand: (FID, sFID, IS, P, R).
T01 = {
    "sit-b": (36.80, 6.77, 40.09, 0.51, 0.63),
    "sit-b-ours": (28.05, 6.04, 50.66, 0.57, 0.63),
    "repa-b": (22.99, 6.70, 64.73, 0.59, 0.65),
    "repa-b-ours": (17.29, 6.56, 79.92, 0.62, 0.65),
    "sit-xl": (17.43, 5.11, 76.00, 0.64, 0.64),
    "sit-xl-ours": (12.42, 4.85, 95.01, 0.68, 0.63),
    "repa-xl": (8.73, 5.21, 118.68, 0.69, 0.65),
    "repa-xl-ours": (8.09, 5.02, 123.23, 0.70, 0.65),
}
T02 = {  # epochs, FID, IS, Recall
    "dit-xl2": (1400, 2.27, 278.20, 0.57),
    "sit-xl2": (1400, 2.06, 270.30, 0.59),
    "repa": (200, 1.96, 264.00, 0.60),
    "reg": (800, 1.36, 299.40, 0.66),
    "sra": (800, 1.58, 311.40, 0.63),
    "diversedit-80ep": (80, 1.89, 276.85, 0.66),
    "diversedit-200ep": (200, 1.52, 282.72, 0.66),
}
FID_ONLY = {
    ("t01", "sit-l"): 18.77,
    ("t01", "repa-l-ours"): 8.47,
    ("t03", "sit-b"): 36.80,
    ("t03", "sit-b-full"): 28.05,
    ("t03", "sit-b-no-div-loss"): 32.77,
    ("t03", "sit-b-no-long-skip"): 33.72,
    ("t03", "repa-b"): 22.99,
    ("t03", "repa-b-full"): 17.29,
    ("t03", "repa-b-no-div-loss"): 20.66,
    ("t03", "repa-b-no-long-skip"): 18.18,
    ("t05", "sit-b"): 36.80,
    ("t05", "range-0.1-0.5"): 28.05,
    ("t05", "range-0.2-0.7"): 30.59,
    ("t05", "range-0.3-0.9"): 31.85,
    ("t06", "meanflow-xl2-ours"): 2.99,
    ("t07", "sit-b"): 36.80,
    ("t07", "repa-b"): 22.99,
    ("t07", "sit-b-ours-disploss-sra"): 21.95,
}
T04 = {  # FID, IS
    "repa-b": (22.99, 64.73),
    "full": (17.29, 79.92),
    "only-orth": (18.97, 75.44),
    "only-mi": (17.70, 78.34),
    "only-disp": (20.85, 68.74),
}
REFERENCE_SPOTS = {  # numbers published elsewhere (baselines-spec §12)
    ("t01", "sit-b2-published", "FID"): 33.0,
    ("t01", "sit-b2-published", "IS"): 43.7,
    ("t01", "repa-b2-published", "FID"): 24.4,
    ("t01", "sit-l2-published", "sFID"): 5.29,
    ("t01", "repa-l2-published", "IS"): 107.5,
    ("t01", "sit-xl2-published", "FID"): 17.2,
    ("t01", "repa-xl2-published", "FID"): 7.9,
    ("t01", "sit-b2-author-rerun", "FID"): 35.900961,
    ("t06", "meanflow-xl2", "FID"): 3.43,
    ("t06", "meanflow-b2", "FID"): 6.17,
    ("t06", "meanflow-xl2plus-2nfe", "FID"): 2.20,
    ("t07", "disploss-sit-b2-baseline", "FID"): 36.49,
    ("t07", "disploss-sit-b2-jax", "FID"): 32.35,
    ("t07", "disploss-sit-b2-pytorch", "FID"): 32.64,
}


def _expected() -> dict[tuple[str, str, str], float]:
    out = {}
    for row, vals in T01.items():
        out |= {("t01", row, m): v for m, v in zip(PAPER_METRICS, vals, strict=True)}
    for row, (_, fid, is_, rec) in T02.items():
        out |= {("t02", row, "FID"): fid, ("t02", row, "IS"): is_, ("t02", row, "Recall"): rec}
    out |= {(t, row, "FID"): v for (t, row), v in FID_ONLY.items()}
    for row, (fid, is_) in T04.items():
        out |= {("t04", row, "FID"): fid, ("t04", row, "IS"): is_}
    return out


def _rows(table: str) -> dict[str, dict]:
    return {r["row"]: r for r in load_published(table, PUBLISHED)["rows"]}


# --- published numbers ---------------------------------------------------------------------------


def test_every_published_file_loads_with_its_table_id():
    docs = load_all_published(PUBLISHED)
    assert list(docs) == ["f01", "t01", "t02", "t03", "t04", "t05", "t06", "t07"]
    for tid, doc in docs.items():
        assert doc["stem"].startswith(tid + "_")
        assert doc["source"].startswith("DiverseDiT (arXiv 2603.04239)")
        assert isinstance(doc["setting"], dict) and doc["title"]
    assert docs["f01"]["kind"] == "figure" and docs["f01"]["rows"] == []
    assert "CKA" in docs["f01"]["description"]
    assert docs["t01"]["source"] == "DiverseDiT (arXiv 2603.04239) Table 1"
    assert docs["t02"]["source"] == "DiverseDiT (arXiv 2603.04239) Table 2"
    for tid in ("t01", "t03", "t04", "t05", "t07"):
        s = docs[tid]["setting"]
        assert (s["N_samples"], s["sampler_steps"], s["cfg_scale"]) == (50000, 250, 1.0)
    assert docs["t02"]["setting"]["cfg_scale"] == 1.8


def test_every_paper_number_matches_the_hand_written_table():
    expected = _expected()
    found = {}
    for tid, doc in load_all_published(PUBLISHED).items():
        for r in doc["rows"]:
            if r["source"].startswith("DiverseDiT (arXiv"):
                found |= {(tid, r["row"], m): v for m, v in r["metrics"].items()}
    assert found.keys() == expected.keys()
    bad = {k: (found[k], v) for k, v in expected.items() if not math.isclose(found[k], v)}
    assert not bad
    for row, (epochs, *_) in T02.items():
        assert _rows("t02")[row]["epochs"] == epochs


def test_spot_values_and_sources():
    assert _rows("t01")["repa-b-ours"]["metrics"]["FID"] == 17.29
    assert _rows("t02")["diversedit-200ep"]["metrics"]["FID"] == 1.52
    const = _rows("t05")["constant-weight"]
    assert const["status"] == "diverges" and const["metrics"] == {}
    for (tid, row, metric), v in REFERENCE_SPOTS.items():
        r = _rows(tid)[row]
        assert math.isclose(r["metrics"][metric], v), (tid, row)
        assert not r["source"].startswith("DiverseDiT (arXiv"), (tid, row)
        assert r["kind"] == ("reproduce" if row == "meanflow-xl2" else "reference"), (tid, row)
    assert _rows("t01")["sit-l"]["source"].endswith("key findings (text)")
    assert _rows("t03")["sit-b"]["source"] == "DiverseDiT (arXiv 2603.04239) Table 1"
    assert _rows("t06")["meanflow-xl2-ours"]["baseline"] == "meanflow-xl2"
    assert _rows("t07")["sit-b-ours-disploss-sra"]["baseline"] == "sit-b"


def test_baselines_exist_and_metric_names_are_the_papers():
    for tid, doc in load_all_published(PUBLISHED).items():
        slugs = {r["row"] for r in doc["rows"]}
        for r in doc["rows"]:
            assert set(r["metrics"]) <= set(PAPER_METRICS), (tid, r["row"])
            for key in ("baseline", "reference_for"):
                assert r[key] is None or (r[key] in slugs and r[key] != r["row"]), (tid, r["row"])
            if "+ Ours" in r["label"]:
                assert r["baseline"] is not None or r["row"] == "repa-l-ours", (tid, r["row"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["rows"][0]["metrics"].update(FD=1.0), "metric 'FD'"),
        (lambda d: d["rows"][1].update(baseline="nope"), "baseline 'nope'"),
        (lambda d: d["rows"][1].update(baseline=d["rows"][1]["row"]), "baseline"),
        (lambda d: d["rows"][0]["metrics"].update(FID="17.29"), "not a positive number"),
        (lambda d: d["rows"][0]["metrics"].update(Recall=1.2), "> 1"),
        (lambda d: d["rows"].append(dict(d["rows"][0])), "duplicate row"),
        (lambda d: d["rows"][0].update(metrics={}), "needs metrics or a status"),
        (lambda d: d["rows"][0].update(status="exploded"), "status 'exploded'"),
        (lambda d: d["rows"][0].update(Row="x"), "unknown key 'Row'"),
        (lambda d: d.update(table="t09"), "does not match"),
        (lambda d: d.pop("source"), "missing key 'source'"),
    ],
)
def test_validator_rejects(edit, message):
    import yaml

    doc = yaml.safe_load((PUBLISHED / "t01_model_scales.yaml").read_text())
    assert validate_published(doc, "t01_model_scales") == []
    edit(doc)
    errs = validate_published(doc, "t01_model_scales")
    assert any(message in e for e in errs), errs


def test_load_published_raises_on_schema_errors(tmp_path):
    bad = tmp_path / "t01_bad.yaml"
    bad.write_text((PUBLISHED / "t01_model_scales.yaml").read_text().replace("FID: 17.29", "FD: 1"))
    with pytest.raises(PublishedError, match="metric 'FD'"):
        load_published(bad)
    with pytest.raises(FileNotFoundError):
        load_published("t99", tmp_path)


# --- results files -------------------------------------------------------------------------------

SMOKE_INFO = {
    "N_samples": 256,
    "N_ref": 1797,
    "extractor": "digits-cnn (stand-in)",
    "sampler": {"mode": "sde", "num_steps": 10, "cfg_scale": 1.0},
}
SMOKE = {  # row: (FD_digits, IS_digits, Precision_digits, Recall_digits)
    "sit-b": (40.0, 3.0, 0.40, 0.50),
    "sit-b-ours": (30.0, 3.5, 0.45, 0.55),
    "repa-b": (25.0, 4.0, 0.50, 0.60),
}


def _smoke_result(row: str, run_dir: str | None = None) -> RowResult:
    fd, is_, p, r = SMOKE[row]
    metrics = {"FD_digits": fd, "IS_digits": is_, "Precision_digits": p, "Recall_digits": r}
    return RowResult(
        "t01", row, "smoke", f"{row} (digits)", metrics, dict(SMOKE_INFO),
        run_dir=run_dir, config_hash="abc123", train_steps=100,
    )  # fmt: skip


def _write_smoke(root: Path) -> Path:
    """Smoke results for three t01 rows with tiny run dirs (relative to ``root``)."""
    rng = np.random.default_rng(0)
    results = root / "results"
    for k, row in enumerate(SMOKE):
        run = root / "runs" / row
        (run / "cka").mkdir(parents=True)
        for step in (0, 50, 100):
            a = rng.random((4, 4))
            a = (a + a.T) / 2
            np.fill_diagonal(a, 1.0)
            np.save(run / "cka" / f"step_{step:08d}.npy", a)
        lines = [
            {"step": s, "loss": 1.0 / s + k, "fm": 0.5 / s, "div": 0.3, "images_per_s": 9.0}
            for s in range(10, 110, 10)
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        write_result(_smoke_result(row, f"runs/{row}"), results)
    # the CKA figure's row: its runs are listed in metric_info["runs"]
    shutil.copytree(root / "runs" / "sit-b" / "cka", root / "runs" / "f01-sit" / "cka")
    info = SMOKE_INFO | {"extractor": "linear CKA", "runs": {"sit": {"run_dir": "runs/f01-sit"}}}
    cka = RowResult("f01", "cka", "smoke", "CKA", {"mean_offdiag_CKA_sit": 0.5}, info)
    write_result(cka, results)
    return results


def test_read_results_needs_an_existing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "missing")
    assert read_results(tmp_path) == []


def test_read_results_skips_a_file_removed_while_reading(tmp_path, monkeypatch):
    """A row rerun with --force beside the reader removes its metrics.json between the listing
    and the read: that row is left out, the others are read."""
    for row in ("sit-b", "repa-b"):
        write_result(_smoke_result(row, f"runs/{row}"), tmp_path)
    gone = tmp_path / "t01" / "smoke" / "repa-b" / "metrics.json"
    read_text = Path.read_text

    def vanishing(self, *args, **kwargs):
        if self == gone:
            self.unlink()
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", vanishing)
    assert [r.row for r in read_results(tmp_path)] == ["sit-b"]


def test_write_and_read_results(tmp_path):
    res = _smoke_result("sit-b", "runs/sit-b")
    path = write_result(res, tmp_path)
    assert path == tmp_path / "t01" / "smoke" / "sit-b" / "metrics.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp left
    assert json.loads(path.read_text())["metrics"]["FD_digits"] == 40.0
    (back,) = read_results(tmp_path)
    assert back == res and back.status == "done"
    shutil.copytree(path.parent, tmp_path / "t01" / "smoke" / "other")
    with pytest.raises(ValueError, match="holds t01/smoke/sit-b"):
        read_results(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics": {"FID": 12.0}}, "reserved for the real Inception"),
        ({"tier": "huge"}, "tier 'huge'"),
        ({"metric_info": {"extractor": "x", "sampler": {}}}, "N_samples"),
        ({"metrics": {"FD_digits": float("nan")}}, "finite"),
        ({"metrics": {}}, "needs metrics"),
        ({"status": "finished"}, "status 'finished'"),
        ({"row": "Bad Row"}, "slug"),
    ],
)
def test_row_result_rejects(change, message):
    kwargs = _smoke_result("sit-b").to_dict() | change
    with pytest.raises(ValueError, match=message):
        RowResult(**kwargs)


def test_diverged_results_need_the_error_and_no_metrics():
    base = _smoke_result("sit-b").to_dict() | {"status": "diverged", "metrics": {}}
    ok = RowResult(**base | {"metric_info": {"error": "step 3: loss became NaN", "step": 3}})
    assert ok.status == "diverged"
    with pytest.raises(ValueError, match="how the run diverged"):
        RowResult(**base | {"metric_info": {}})
    with pytest.raises(ValueError, match="no metrics"):
        RowResult(**base | {"metrics": {"FD_digits": 1.0}, "metric_info": {"error": "x"}})


def test_paper_metric_names():
    assert paper_metric("FID") == "FID" and paper_metric("FD_digits") == "FID"
    assert paper_metric("sFD_digits") == "sFID" and paper_metric("Recall_digits") == "Recall"
    assert paper_metric("FD") is None and paper_metric("loss") is None


@needs_pandas
def test_aggregate_smoke_tier(tmp_path):
    import pandas as pd

    results = _write_smoke(tmp_path)
    df = aggregate(results, PUBLISHED)
    t01 = df[df["table"] == "t01"].set_index(["tier", "row", "metric"])
    # done rows: reproduced, published FID next to FD_digits, no delta across different metrics,
    # and the in-pipeline gain
    ours = t01.loc[("smoke", "sit-b-ours", "FD_digits")]
    assert ours["reproduced"] == 30.0 and ours["published"] == 28.05
    assert math.isnan(ours["delta"])
    assert ours["gain_vs_baseline"] == pytest.approx(30.0 - 40.0)
    assert ours["published_gain"] == pytest.approx(28.05 - 36.80)
    assert ours["baseline_row"] == "sit-b" and ours["label"] == "SiT-B + Ours"
    assert t01.loc[("smoke", "sit-b-ours", "IS_digits"), "gain_vs_baseline"] == pytest.approx(0.5)
    assert (ours["extractor"], ours["N"], ours["status"]) == ("digits-cnn (stand-in)", 256, "done")
    assert math.isnan(t01.loc[("smoke", "sit-b", "FD_digits"), "gain_vs_baseline"])
    # pending rows: present, NaN (never 0), in the smoke tier's metric names and the paper tier
    pending = t01.loc[("smoke", "repa-b-ours", "FD_digits")]
    assert pending["status"] == "pending" and math.isnan(pending["reproduced"])
    assert pending["published"] == 17.29 and math.isnan(pending["gain_vs_baseline"])
    smoke = df[(df["tier"] == "smoke") & (df["status"] == "pending")]
    assert set(smoke["row"]) == set(T01) - set(SMOKE) | {"sit-l", "repa-l-ours"}
    assert smoke["reproduced"].isna().all() and (df["reproduced"] != 0).all()
    paper = df[(df["table"] == "t01") & (df["tier"] == "paper")]
    assert len(paper) == 8 * 5 + 2 and (paper["status"] == "pending").all()
    assert set(df.loc[df["table"] == "t05", "row"]) >= {"constant-weight"}
    diverges = df[(df["table"] == "t05") & (df["row"] == "constant-weight")]
    assert (diverges["published_status"] == "diverges").all()
    # never comparable below the paper tier; reference rows are not expected results
    assert not df["comparable"].any()
    assert not df["row"].str.endswith("-published").any()
    assert {"t02", "t06", "t07"} <= set(df["table"])
    f01 = df[df["table"] == "f01"]
    assert list(f01["metric"]) == ["mean_offdiag_CKA_sit"] and (f01["kind"] == "unpublished").all()
    csv, pq = save_aggregate(df, results)
    assert csv == results / "aggregate.csv" and pq.is_file()
    back = pd.read_parquet(pq)
    assert len(back) == len(df) and back["reproduced"].isna().sum() == df["reproduced"].isna().sum()
    assert pd.read_csv(csv)["reproduced"].isna().sum() == df["reproduced"].isna().sum()


@needs_pandas
def test_comparable_only_for_paper_tier_inception_at_50k(tmp_path):
    def info(n: int, extractor: str = "inception-v3-compat") -> dict:
        return {"N_samples": n, "N_ref": 50000, "extractor": extractor, "sampler": {}}

    base = {"table": "t01", "label": "x"}
    write_result(RowResult(row="repa-b", tier="paper", metrics={"FID": 23.5, "IS": 60.0},
                           metric_info=info(50000), **base), tmp_path)  # fmt: skip
    write_result(RowResult(row="repa-b-ours", tier="paper", metrics={"FID": 18.0},
                           metric_info=info(10000), **base), tmp_path)  # fmt: skip
    write_result(RowResult(row="repa-b", tier="mini", metrics={"FID": 50.0},
                           metric_info=info(50000), **base), tmp_path)  # fmt: skip
    df = aggregate(tmp_path, PUBLISHED)
    df = df[df["table"] == "t01"].set_index(["tier", "row", "metric"])
    assert df.loc[("paper", "repa-b", "FID"), "comparable"]
    assert df.loc[("paper", "repa-b", "FID"), "delta"] == pytest.approx(23.5 - 22.99)
    assert not df.loc[("paper", "repa-b-ours", "FID"), "comparable"]  # N = 10,000
    assert df.loc[("paper", "repa-b-ours", "FID"), "gain_vs_baseline"] == pytest.approx(-5.5)
    assert not df.loc[("mini", "repa-b", "FID"), "comparable"]
    assert math.isnan(df.loc[("mini", "repa-b-ours", "FID"), "reproduced"])


# --- report builders (no kernel) -----------------------------------------------------------------


@needs_report
def test_table_frame_and_figures(tmp_path):
    from diversedit import report

    results = _write_smoke(tmp_path)
    agg = aggregate(results, PUBLISHED)
    frame = report.table_frame(agg, "t01", "smoke")
    col = "FD_digits (paper: FID)"
    assert frame.loc["REPA-B + Ours", (col, "reproduced")] == "pending"
    assert frame.loc["SiT-B + Ours", (col, "reproduced")] == "30.00"
    assert frame.loc["SiT-B + Ours", (col, "Δ")] == "—"  # FD_digits vs FID: no difference shown
    assert frame.loc["SiT-B + Ours", ("gain vs baseline", "FD_digits")] == "-10.00"
    assert "0.00" not in set(frame[(col, "reproduced")])
    t05 = report.table_frame(agg, "t05", "paper")
    assert t05.loc["constant weight", ("FID", "published")] == "diverges"
    assert SMOKE_BANNER in report.banner(agg, "t01", "smoke").data
    assert "pending" in report.banner(agg, "t01", "paper").data
    assert "pending" in report.styled_table(agg, "t01", "smoke").to_html()
    # a result whose label another row also has (a copied row file): both rows stay, by slug
    copy = dataclasses.replace(_smoke_result("sit-b"), row="sit-b-copy", label="SiT-B")
    write_result(copy, results)
    agg2 = aggregate(results, PUBLISHED)
    frame2 = report.table_frame(agg2, "t01", "smoke")
    assert {"SiT-B (sit-b)", "SiT-B (sit-b-copy)"} <= set(frame2.index)
    assert frame2.index.is_unique and "SiT-B + Ours" in frame2.index
    assert "SiT-B (sit-b-copy)" in report.styled_table(agg2, "t01", "smoke").to_html()

    fig = report.comparison_figure(agg, "t01")
    traces = {t.name: t for t in fig.data}
    assert list(traces["smoke: FD_digits"].y) == [40.0, 30.0, 25.0]
    assert 17.29 in traces["published (FID)"].y
    gain = {t.name: t for t in report.gain_figure(agg, "t01").data}
    assert list(gain["smoke: FD_digits"].y) == [-10.0]

    snaps = report.load_cka(tmp_path / "runs" / "sit-b")
    assert [s for s, _ in snaps] == [0, 50, 100] and snaps[0][1].shape == (4, 4)
    cka = report.cka_figure(snaps, "cka")
    assert len(cka.data) == 3 and len(cka.layout.sliders[0].steps) == 3
    assert [t.visible for t in cka.data] == [False, False, True]
    np.save(tmp_path / "runs" / "sit-b" / "cka" / "step_00000200.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\(L, L\)"):
        report.load_cka(tmp_path / "runs" / "sit-b")

    logs = {"a": report.read_log(tmp_path / "runs" / "sit-b" / "log.jsonl")}
    curves = report.training_figure(logs, "losses")
    assert [b.label for b in curves.layout.updatemenus[0].buttons] == ["loss", "div", "fm"]
    assert curves.data[0].visible and list(curves.data[0].x)[:2] == [10, 20]


@needs_report
def test_tiers_with_row_files_are_counted_and_shown_as_pending(tmp_path):
    """A tier with row files but no results reads "0 / N" and gets its section, rows pending."""
    from IPython.display import HTML

    from diversedit import report

    params = tmp_path / "params"
    shutil.copytree(PUBLISHED, params / "published")
    for stem, rows in (("t01_model_scales", ["sit-b"]), ("t04_loss_terms", list(T04))):
        (params / stem / "smoke").mkdir(parents=True)
        for row in rows:
            text = f"table: x\nrow: {row}\nextractor: digits-cnn\n"
            (params / stem / "smoke" / f"{row}.yaml").write_text(text)
    results = _write_smoke(tmp_path)
    # aggregate alone: only tiers with results (and the paper tier), as before
    plain = aggregate(results, params / "published")
    assert "smoke" not in set(plain.loc[plain["table"] == "t04", "tier"])
    data = report.load_report_data(results, params / "published")
    assert data.agg.query("table == 't04' and tier == 'smoke'")["reproduced"].isna().all()
    _, counts = report.overview(data)
    assert counts.loc["t04", "smoke"] == "0 / 5"
    assert counts.loc["t01", "smoke"] == "3 / 10"  # 3 results of the 10 published rows
    assert counts.loc["t02", "smoke"] == "—"  # no smoke row file, no result
    assert counts.loc["t04", "paper"] == "0 / 5" and "mini" not in counts.columns
    page = "".join(i.data for i in report.table_section(data, "t04") if isinstance(i, HTML))
    assert "t04 · smoke tier" in page and 'data-table="t04" data-tier="smoke"' in page
    frame = report.table_frame(data.agg, "t04", "smoke")
    # pending smoke rows carry the names their digits-cnn rows will report, never "FID"
    fd = "FD_digits (paper: FID)"
    assert set(frame[(fd, "reproduced")]) == {"pending"} and len(frame) == 5
    assert not {c for c, _ in frame.columns} & {"FID", "IS", "Precision", "Recall", "sFID"}
    assert not any(v.startswith("0.0") for v in frame.to_numpy().ravel())
    assert report.comparison_figure(data.agg, "t04").data[0].name == "published (FID)"
    # the default row-file directory is the published directory's parent (the repo's params/)
    repo = report.load_report_data(results, PUBLISHED)
    assert report.overview(repo)[1].loc["t04", "smoke"] == "0 / 5"


@needs_report
def test_shared_runs_idle_diversity_and_figure_rows(tmp_path):
    """A run shared by two tables is in both tables' curves (one CKA heatmap); a row whose
    diversity weight stayed 0 says so; the CKA figure's tiers list their row files."""
    from IPython.display import HTML

    from diversedit import report

    results = _write_smoke(tmp_path)
    for row, weights in (("only-disp", [0.0, 0.0]), ("only-orth", [0.0, 0.2])):
        run = tmp_path / "runs" / row
        run.mkdir()
        lines = [
            {"step": 10 * (i + 1), "loss": 1.0, "div_weight": w} for i, w in enumerate(weights)
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        res = dataclasses.replace(_smoke_result("sit-b", f"runs/{row}"), table="t04", row=row)
        write_result(res, results)
    # a run that started from only-orth's step-20 checkpoint: its curve and weights include those
    cont = tmp_path / "runs" / "cont"
    cont.mkdir()
    start = {"resumed_from": str(tmp_path / "runs/only-orth/checkpoints/step_00000020.pt")}
    (cont / "provenance.jsonl").write_text(json.dumps(start | {"step": 20}) + "\n")
    (cont / "log.jsonl").write_text(json.dumps({"step": 30, "loss": 1.0, "div_weight": 0.0}))
    res = dataclasses.replace(_smoke_result("sit-b", "runs/cont"), table="t04", row="only-mi")
    write_result(res, results)
    assert list(report.trajectory_log(cont)["div_weight"]) == [0.0, 0.2, 0.0]
    shared = dataclasses.replace(_smoke_result("sit-b", "runs/sit-b"), table="t04", row="repa-b")
    write_result(shared, results)  # the same run directory as t01's sit-b
    runs = [
        (r.table, r.row, d.name)
        for r, _, d in report._runs(report.load_report_data(results, PUBLISHED))
    ]
    assert ("t01", "sit-b", "sit-b") in runs and ("t04", "repa-b", "sit-b") in runs
    data = report.load_report_data(results, PUBLISHED)
    curves = {f.layout.title.text: f for f in report.training_section(data)[1:]}
    t04 = {t.name for t in curves["t04 · smoke tier: training losses"].data}
    assert t04 == {"REPA-B", "only L_disp", "only L_orth", "only L_MI"}
    heatmaps = [i for i in report.cka_section(data) if not isinstance(i, HTML)]
    titles = [f.layout.title.text for f in heatmaps if hasattr(f, "layout")]
    assert "CKA — t01 · SiT-B<br><sup>smoke tier</sup>" in titles  # sit-b's run: once
    assert not any(t.startswith("CKA — t04 · REPA-B") for t in titles)
    frame = report.table_frame(data.agg, "t04", "smoke")
    status = frame[("", "status")]
    assert status["only L_disp"] == "done, diversity loss idle (w = 0 at every step)"
    assert status["only L_orth"] == "done" and status["REPA-B"] == "done"
    assert status["only L_MI"] == "done"  # w > 0 before it started from only-orth's checkpoint
    # f01: the paper tier's row file pending, under the names the smoke result reports
    f01 = data.agg[data.agg["table"] == "f01"].set_index(["tier", "row"])
    assert f01.loc[("paper", "cka"), "status"] == "pending"
    assert f01.loc[("paper", "cka"), "metric"] == "mean_offdiag_CKA_sit"
    assert report.overview(data)[1].loc["f01", "paper"] == "0 / 1"
    frame = report.table_frame(data.agg, "f01", "smoke")
    assert [c for c, _ in frame.columns] == ["", "", *["mean_offdiag_CKA_sit"] * 3]  # no gain
    # metrics that are not the paper's keep the order the notebook wrote them in
    cka = {f"mean_offdiag_CKA_{r}": 0.5 for r in ("sit", "repa", "diversedit")}
    info = SMOKE_INFO | {"extractor": "linear CKA"}
    write_result(RowResult("f01", "cka", "smoke", "CKA", cka, info), results)
    frame = report.table_frame(aggregate(results, PUBLISHED), "f01", "smoke")
    assert list(dict.fromkeys(c for c, _ in frame.columns[2:])) == list(cka)


@needs_report
def test_read_log_keeps_a_step_once_and_skips_a_torn_last_line(tmp_path):
    from diversedit import report

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 20, "loss": 2.0}\n{"step": 10, "loss": 1.0}\n'
                   '{"step": 20, "loss": 3.0}\n{"step": 30, "lo')  # fmt: skip
    frame = report.read_log(log)
    assert list(frame["step"]) == [10, 20] and list(frame["loss"]) == [1.0, 3.0]
    log.write_text('{"step": 10, "lo\n{"step": 20, "loss": 2.0}\n')
    with pytest.raises(json.JSONDecodeError):  # torn in the middle: not a kill, a broken file
        report.read_log(log)


@needs_report
def test_figure_layouts_and_panel_titles(tmp_path):
    from diversedit import report

    results = _write_smoke(tmp_path)
    agg = aggregate(results, PUBLISHED)
    for fig in (report.comparison_figure(agg, "t01"), report.gain_figure(agg, "t01")):
        legend = fig.layout.legend
        # legend right of the plots, clear of the rotated row labels under the x axes
        assert legend.orientation == "v" and legend.x >= 1 and legend.xanchor == "left"
        assert fig.layout.xaxis.automargin and fig.layout.xaxis2.automargin
    titles = [a.text for a in report.gain_figure(agg, "t01").layout.annotations]
    assert len(titles) == 2 and all(t.startswith("t01 · ") and "gain" in t for t in titles)
    assert "FID gain" in titles[0] and "FD_digits gain" in titles[1] and "smoke tier" in titles[1]
    assert not any("paper tier" in t for t in titles)  # no paper-tier result: not claimed
    titles = [a.text for a in report.comparison_figure(agg, "t01").layout.annotations]
    assert titles[0].startswith("t01 · FID") and "gain" not in titles[0]
    info = {"N_samples": 50000, "N_ref": 50000, "extractor": "adm-evaluator", "sampler": {}}
    for row, fid in (("sit-b", 36.0), ("sit-b-ours", 29.0)):
        write_result(RowResult("t01", row, "paper", row, {"FID": fid}, info), results)
    agg = aggregate(results, PUBLISHED)
    gain = report.gain_figure(agg, "t01")
    assert "published vs paper tier" in gain.layout.annotations[0].text
    assert list(gain.data[1].y) == [-7.0] and "gain" in gain.data[1].name
    # CKA heatmaps: whole blocks on both axes
    fig = report.cka_figure([(0, np.eye(4)), (10, np.eye(4))], "cka")
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert (axis.tickmode, axis.tick0, axis.dtick) == ("linear", 1, 1)
    big = report.cka_figure([(0, np.eye(28))], "cka").layout.yaxis.dtick
    assert isinstance(big, int) and big >= 1


@needs_report
def test_notebook_parameters_and_offline_renderer(tmp_path):
    import jupytext
    import papermill as pm
    import plotly.graph_objects as go
    import plotly.io as pio

    from diversedit import report

    nb = tmp_path / "report.ipynb"
    jupytext.write(jupytext.read(report.REPORT_NOTEBOOK), nb, fmt="ipynb")
    params = pm.inspect_notebook(str(nb))
    assert set(params) == {"results_dir", "published_dir"}
    assert params["published_dir"]["default"] == '"params/published"'
    assert report.report_kernel() in ("diversedit", "python3")
    old = pio.renderers.default
    try:
        pio.renderers.default = report.REPORT_RENDERER_ENV
        assert report.configure_plotly() == f"plotly_mimetype+{report.OFFLINE_RENDERER}"
        bundle = pio.renderers[report.OFFLINE_RENDERER].to_mimebundle(
            go.Figure(go.Bar(y=[1, 2])).to_dict()
        )
        assert "Plotly.newPlot" in bundle["text/html"] and "<script src" not in bundle["text/html"]
    finally:
        pio.renderers.default = old


@needs_report
def test_export_refuses_figures_without_html(tmp_path):
    import nbformat

    from diversedit import report

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fig")
    cell.outputs = [
        nbformat.v4.new_output(
            "display_data", data={"application/vnd.plotly.v1+json": {"data": [], "layout": {}}}
        )
    ]
    nb.cells.append(cell)
    path = tmp_path / "bare.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(RuntimeError, match="without HTML"):
        report.export_html(path)


# --- the HTML report (one build) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from diversedit import report

    root = tmp_path_factory.mktemp("report")
    results = _write_smoke(root)
    out = report.build_report(results, PUBLISHED)
    return root, out, out.read_text()


def _decode(values):
    if isinstance(values, dict) and "bdata" in values:  # plotly's typed-array encoding
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return values


def _figures(page: str) -> list[tuple[list[dict], dict]]:
    """``(data, layout)`` of every ``Plotly.newPlot(id, data, layout, …)`` call in the page."""
    dec = json.JSONDecoder()
    figures = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        data, end = dec.raw_decode(page, m.end())
        comma = re.compile(r"\s*,\s*").match(page, end)
        layout, _ = dec.raw_decode(page, comma.end())
        figures.append((data, layout))
    return figures


@needs_report
def test_report_html(built):
    root, out, page = built
    results = root / "results"
    assert out == results / "report" / "index.html"
    assert (results / "aggregate.csv").is_file() and (results / "aggregate.parquet").is_file()
    for tid in ("t01", "t02", "t03", "t04", "t05", "t06", "t07", "f01"):
        assert f'id="{tid}"' in page, tid
    assert SMOKE_BANNER in page
    assert ">pending<" in page
    assert "report.configure_plotly()" not in page  # code cells hidden
    figures = _figures(page)
    assert len(figures) >= 5
    with_data = [d for d, _ in figures if any(_decode(t.get("y") or t.get("z")) for t in d)]
    assert with_data, "no plotly figure carries data"
    traces = [t for d, _ in figures for t in d]
    smoke = [t for t in traces if t.get("name") == "smoke: FD_digits"]
    assert smoke and _decode(smoke[0]["y"]) == [40.0, 30.0, 25.0]
    assert any(t.get("type") == "heatmap" for t in traces)
    titles = {layout.get("title", {}).get("text") for _, layout in figures}
    assert "CKA — t01 · SiT-B<br><sup>smoke tier</sup>" in titles  # relative run_dir resolved
    assert "CKA — f01 · CKA · sit<br><sup>smoke tier</sup>" in titles  # runs in metric_info
    assert 'data-table="f01"' in page and page.count('id="f01"') == 1
    assert "t01 · smoke tier: training losses" in titles
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js inlined exactly once
    assert not re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", page, re.I)
    assert "require.min.js" not in page and "mathjax" not in page.lower().split("<main>")[0]
    # what a reader sees: counts for every tier with row files, no internal-summary wording
    text = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S | re.I)
    assert "summary" not in text.lower()
    assert "not transcribed" in text
    assert re.search(r"<th[^>]*>t04</th>\s*<td[^>]*>0 / 5</td>\s*<td[^>]*>0 / 5</td>", text)
    assert "t04 · smoke tier" in text


@needs_report
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
def test_report_renders_in_chromium(built, tmp_path):
    _, out, _ = built
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000", "--dump-dom", out.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('class="main-svg"') >= 2, "plotly drew no SVG"
    assert "hm" in dom or "heatmaplayer" in dom or "heatmap" in dom
