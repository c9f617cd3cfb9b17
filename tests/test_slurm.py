"""The SLURM training script's signal handling, with stand-ins for srun and scontrol."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "params" / "slurm" / "train.sbatch"
SCONTROL = """#!/bin/bash
case "$1" in
  show) echo node1 ;;
  requeue) echo "requeue $2" >> "$REQUEUED" ;;
esac
"""
# srun with its trainers: checkpoint and exit 85 on SIGTERM, else finish after a while
SRUN = """#!/bin/bash
trap 'sleep 0.5; exit 85' TERM
touch "$STARTED"
for i in $(seq 30); do sleep 0.1; done
exit "$FINISH"
"""


def _start(tmp_path: Path, finish: int) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "REQUEUED": str(tmp_path / "requeued"),
        "STARTED": str(tmp_path / "started"),
        "FINISH": str(finish),
    }
    cmd = ["bash", str(SCRIPT), "params/train/sit_b2_diversedit.yaml"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    return proc


def test_preemption_sigterm_to_the_job_requeues_it(tmp_path):
    """SLURM's preemption signals the batch shell and the job steps alike: the shell must
    outlive the signal, wait for the trainers' checkpoint (85) and requeue."""
    proc = _start(tmp_path, finish=0)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 85, out
    assert (tmp_path / "requeued").read_text() == "requeue 42\n"
    assert "requeueing job 42" in out


@pytest.mark.parametrize("finish", [0, 1])
def test_a_run_that_ends_by_itself_is_not_requeued(tmp_path, finish):
    proc = _start(tmp_path, finish=finish)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == finish, out
    assert not (tmp_path / "requeued").exists()
