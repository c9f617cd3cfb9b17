"""The command line's handling of bad input: one ``error: ...`` line, exit status 2, nothing
run or written."""

from pathlib import Path

import pytest

from diversedit.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``diversedit ARGV``, check it exits with status 2, and return its one error line."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr.strip()


def test_train_set_without_equals(capsys):
    params = str(ROOT / "params" / "train" / "digits_diversedit.yaml")
    line = _fails(["train", params, "--set", "optimlr", "--dry-run"], capsys)
    assert line == "error: --set 'optimlr': expected KEY=VALUE, e.g. --set optim.lr=2e-4"


def test_report_missing_directories(tmp_path, capsys):
    published = str(ROOT / "params" / "published")
    line = _fails(["report", "--results", str(tmp_path / "none"), "--published", published], capsys)
    assert line == f"error: results directory {tmp_path / 'none'} does not exist"
    line = _fails(["report", "--results", str(tmp_path), "--published", "nowhere"], capsys)
    assert line == "error: --published nowhere: no such directory of published numbers"
    assert not any(tmp_path.iterdir())  # no aggregate, no page


def test_bench_counts_must_be_positive(tmp_path, capsys):
    out = tmp_path / "b.json"
    for flag in ("--steps", "--batch"):
        argv = ["bench", "--sizes", "tiny", "--parts", "loss", flag, "0", "--out", str(out)]
        assert _fails(argv, capsys) == f"error: diversedit bench: {flag} must be >= 1, got 0"
    assert not out.exists()


def test_prepare_missing_source_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "dest"
    line = _fails(["prepare", "--source", str(tmp_path / "none"), "--dest", str(dest)], capsys)
    assert "does not exist" in line and not dest.exists()


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import diversedit.generate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(diversedit.generate, "run_args", interrupted)
    with pytest.raises(SystemExit) as err:
        main(["sample", "anything"])
    assert err.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_report_leaves_the_published_default_to_the_library(tmp_path, monkeypatch, capsys):
    """No --published: the report's own default ($DIVERSEDIT_PUBLISHED_DIR, else the repo's)."""
    import diversedit.report

    seen = []
    monkeypatch.setattr(
        diversedit.report,
        "build_report",
        lambda results, published: seen.append(published) or tmp_path,
    )
    main(["report", "--results", str(tmp_path)])
    assert seen == [None] and "report:" in capsys.readouterr().out


def test_train_refuses_a_run_it_cannot_continue_exactly(tmp_path, capsys):
    """A run directory whose config.json has other hashed values: one line, exit 2."""
    import json

    from accelerate.state import AcceleratorState

    params = str(ROOT / "params" / "train" / "digits_sit.yaml")
    argv = ["train", params, "--set", f"results_dir={tmp_path}", "--set", "model.depth=2",
            "--set", "optim.max_steps=1", "--set", "logging.tensorboard=false"]  # fmt: skip
    AcceleratorState._reset_state(True)
    main(argv)
    (run,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"seed": 7}))
    capsys.readouterr()
    AcceleratorState._reset_state(True)
    line = _fails(argv, capsys)
    assert line.endswith("differs from this run's configuration: seed: 7 → 0")
