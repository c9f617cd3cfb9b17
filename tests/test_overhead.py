"""Paired overheads pooled over bench records (`diversedit overhead`), and their verdicts."""

import json
import statistics

import pytest

from diversedit.__main__ import main
from diversedit.overhead import median_ci, pool, summary, verdict

MACHINE = {"git_commit": "a" * 40, "dirty": False, "cpu": "Xeon", "threads": 2, "torch": "2.14"}
SETTINGS = {"compile_mode": None, "compile_scope": None, "keep_freed_memory": True}


def step(variant, times, *, size="S/2", batch=8, timing="interleaved", accum=None):
    return {"size": size, "variant": variant, "device": "cpu", "dtype": "fp32", "batch": batch,
            "compiled": False, "update": "library", "diversity_triton": False,
            "step_times_ms": list(times), "timing": timing} | (
        {"accum": accum} if accum else {})  # fmt: skip


def record(path, steps, **machine):
    path.write_text(
        json.dumps({"machine": MACHINE | machine, "settings": SETTINGS, "train_step": steps})
    )
    return path


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict((0.07, 0.0999), 0.10) == "met"
    assert verdict((0.07, 0.10), 0.10) == "met"  # at most 10%
    assert verdict((0.1001, 0.2), 0.10) == "not met"
    assert verdict((0.09, 0.11), 0.10) == "undecided"
    assert verdict(None, 0.10) == "undecided"  # too few rounds for an interval


def test_pool_pairs_rounds_within_records_and_pools_equal_measurements(tmp_path):
    """Rounds pair within a record (a slow round slows both variants); records of the same
    measurement pool their rounds; another batch or machine is another measurement."""
    base_a, base_b = [100.0, 200.0, 100.0] * 4, [300.0] * 12
    over_a = [0.05, 0.06, 0.07] * 4
    over_b = [0.09 + 0.001 * i for i in range(12)]
    a = record(tmp_path / "a.json", [
        step("sit", base_a),
        step("diversedit", [b * (1 + o) for b, o in zip(base_a, over_a, strict=True)]),
    ])  # fmt: skip
    b = record(tmp_path / "b.json", [
        step("diversedit", [b * (1 + o) for b, o in zip(base_b, over_b, strict=True)], accum=1),
        step("sit", base_b, accum=1),
    ], git_commit="b" * 40, dirty=True)  # fmt: skip
    c = record(tmp_path / "c.json", [step("sit", [1.0] * 6), step("diversedit", [2.0] * 6)],
               cpu="another")  # fmt: skip
    d = record(tmp_path / "d.json", [step("sit", [1.0] * 6, batch=4),
                                     step("long_skip", [1.5] * 6, batch=4)])  # fmt: skip
    e = record(tmp_path / "e.json", [step("sit", [1.0] * 6, accum=4),
                                     step("diversedit", [1.2] * 6, accum=4)])  # fmt: skip
    pooled, skipped = pool([a, b, c, d, e])
    assert skipped == []
    assert [(p["variant"], p["rounds"]) for p in pooled] == [
        ("diversedit", 24),  # a (no accum: a record from before --accum) with b (accum 1)
        ("diversedit", 6),
        ("long_skip", 6),
        ("diversedit", 6),  # four micro-batches a step: another measurement
    ]
    first = pooled[0]
    ratios = over_a + over_b
    assert first["overhead"] == pytest.approx(statistics.median(ratios))
    assert first["ci95"] == pytest.approx(median_ci(ratios))
    assert [r["rounds"] for r in first["records"]] == [12, 12]
    assert first["records"][0]["overhead"] == pytest.approx(0.06)
    assert first["records"][1]["overhead"] == pytest.approx(statistics.median(over_b))
    assert first["revisions"] == ["aaaaaaaaaa", "bbbbbbbbbb+dirty"]
    assert first["measurement"]["machine.cpu"] == "Xeon" and first["measurement"]["batch"] == 8
    assert pooled[1]["overhead"] == pytest.approx(1.0)
    assert pooled[1]["measurement"]["machine.cpu"] == "another"
    assert pooled[2]["overhead"] == pytest.approx(0.5) and pooled[2]["base"] == "sit"
    text = summary(pooled, skipped, target=0.10)
    lo, hi = first["ci95"]
    assert text.splitlines()[3] == (
        f"  pooled (24 rounds): +8.0% [{lo:+.1%}, {hi:+.1%}]: met at <= 10.0%"
    )
    assert "code revisions pooled: aaaaaaaaaa, bbbbbbbbbb+dirty" in text


def test_pool_skips_what_does_not_pair(tmp_path):
    seq = record(
        tmp_path / "seq.json",
        [
            step("sit", [1.0] * 6, timing="sequential"),
            step("diversedit", [1.1] * 6, timing="sequential"),
        ],
    )
    lone = record(tmp_path / "lone.json", [step("diversedit", [1.1] * 6)])
    other = record(
        tmp_path / "other.json", [step("sit", [1.0] * 6, size="B/2"), step("diversedit", [1.1] * 6)]
    )
    short = record(tmp_path / "short.json", [step("sit", [1.0] * 5), step("diversedit", [1.1] * 6)])
    pooled, skipped = pool([seq, lone, other, short])
    assert pooled == []
    assert skipped == [
        f"{seq}: S/2 diversedit: not timed in interleaved rounds",
        f"{lone}: S/2 diversedit: no sit timings in the same rounds",
        f"{other}: S/2 diversedit: no sit timings in the same rounds",
        f"{short}: S/2 diversedit: no sit timings in the same rounds",
    ]
    assert pool([other], base="diversedit")[1] == [f"{other}: B/2 sit: no diversedit timings "
                                                   "in the same rounds"]  # fmt: skip


def test_overhead_cli(tmp_path, capsys):
    a = record(tmp_path / "a.json", [step("sit", [100.0] * 8), step("diversedit", [120.0] * 8)])
    out = tmp_path / "pooled.json"
    main(["overhead", str(a), "--target", "0.1", "--out", str(out)])
    assert "pooled (8 rounds): +20.0% [+20.0%, +20.0%]: not met at <= 10.0%" in (
        capsys.readouterr().out
    )
    doc = json.loads(out.read_text())
    assert doc["target"] == 0.1 and doc["pooled"][0]["overhead"] == pytest.approx(0.2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"machine": {}, "settings": {}, "train_step": {}}')
    cases = [
        ([str(tmp_path / "none.json")], f"{tmp_path / 'none.json'}: no such file"),
        ([str(bad)], f"{bad}: not a `diversedit bench` record"),
        ([str(a), "--base", "long_skip"], "no interleaved timings of a variant and 'long_skip'"),
        ([str(a), "--target", "10"], "--target 10.0: a fraction from 0 to 1"),
        ([str(a), "--out", "/proc/none/o.json"], "--out /proc/none/o.json: "),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["overhead", *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_process_pairs_give_one_ratio_each(tmp_path):
    """``pairs``: records two by two, SiT alone then the other variants alone (each in its own
    process); each pair is one ratio of median steps, pooled over pairs of one measurement."""
    ratios = [0.06, 0.11, 0.08, 0.09, 0.10, 0.07]
    paths = []
    for i, ratio in enumerate(ratios):
        base = [200.0 + i, 100.0 + i, 100.0 + i]  # median 100 + i
        paths += [
            record(tmp_path / f"p{i}_sit.json", [step("sit", base, timing="sequential")]),
            record(tmp_path / f"p{i}_div.json", [
                step("diversedit", [(100.0 + i) * (1 + ratio)] * 3, timing="sequential"),
                step("long_skip", [(100.0 + i) * 1.08] * 3, timing="sequential"),
            ], git_commit="b" * 40 if i == 5 else "a" * 40),
        ]  # fmt: skip
    pooled, skipped = pool(paths, pairs=True)
    assert skipped == []
    div, skip = pooled
    assert (div["variant"], div["rounds"], div["unit"]) == ("diversedit", 6, "process pairs")
    assert div["overhead"] == pytest.approx(statistics.median(ratios))
    assert div["ci95"] == pytest.approx(median_ci(ratios)) and div["ci95"] is not None
    assert skip["overhead"] == pytest.approx(0.08)
    assert div["revisions"] == ["aaaaaaaaaa", "aaaaaaaaaa / bbbbbbbbbb"]
    text = summary(pooled, skipped, target=0.10)
    assert f"  {paths[0]}, {paths[1]} (aaaaaaaaaa): +6.0%" in text
    assert "  pooled (6 process pairs): +8.5% [+6.0%, +11.0%]: undecided at <= 10.0%" in text
    assert pool(paths)[0] == []  # read as interleaved records, nothing pairs


def test_process_pairs_skip_what_is_not_a_pair(tmp_path):
    sit = record(tmp_path / "sit.json", [step("sit", [1.0] * 3, timing="sequential")])
    both = record(tmp_path / "both.json", [step("sit", [1.0] * 3), step("diversedit", [1.1] * 3)])
    other = record(tmp_path / "b4.json", [step("diversedit", [1.1] * 3, batch=4)])
    div = record(tmp_path / "div.json", [step("diversedit", [1.1] * 3)])
    pooled, skipped = pool([both, div, sit, other, sit, both], pairs=True)
    assert pooled == []
    assert skipped == [
        f"{both}: not a record of sit alone, the first of a pair",
        f"{other}: S/2 diversedit: another measurement than {sit}'s sit",
        f"{both}: holds sit too, not the second record of a pair",
    ]
    with pytest.raises(ValueError, match="--pairs: 3 records, an odd number"):
        pool([sit, div, sit], pairs=True)


def test_overhead_cli_pairs(tmp_path, capsys):
    paths = []
    for i in range(6):
        paths += [
            record(tmp_path / f"{i}s.json", [step("sit", [100.0], timing="sequential")]),
            record(tmp_path / f"{i}d.json", [step("diversedit", [105.0], timing="sequential")]),
        ]  # fmt: skip
    out = tmp_path / "pairs.json"
    main(["overhead", "--pairs", *map(str, paths), "--target", "0.1", "--out", str(out)])
    assert "pooled (6 process pairs): +5.0% [+5.0%, +5.0%]: met at <= 10.0%" in (
        capsys.readouterr().out
    )
    assert json.loads(out.read_text())["pairs"] is True
    for args, message in [
        (paths[:3], "--pairs: 3 records, an odd number"),
        (paths[1:3], "no process pairs of a variant and 'sit' to pair"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["overhead", "--pairs", *map(str, args)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
