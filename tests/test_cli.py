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
