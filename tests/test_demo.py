"""The README's first command, in a short mode: the example shop end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from emulator import find_binary

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_shop_end_to_end_and_cleans_up() -> None:
    env = {**os.environ, "CELERY_CLOUDTASKS_EMULATOR_BIN": find_binary()}
    proc = subprocess.run(
        [sys.executable, "example_project/demo.py", "--orders", "8", "--failing", "1", "--plain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "18/18 pipelines and reports succeeded, 2/2 failing syncs dead-lettered" in out
    assert re.search(r"acme: orders\s+SUCCESS\s+8", out)
    assert re.search(r"globex: legacy ERP\s+FAILURE\s+1", out)
    assert re.search(r"shop-dead-letters \(paused\)\s+2", out)
    assert re.search(r"deliveries retry_scheduled\s+\d+", out)  # charge_payment retried
    assert re.search(r"deliveries redeliver\s+\d+", out)  # reserve_stock redelivered
    assert re.search(r"latency ms p50 [\d.]+, p90 [\d.]+, p99 [\d.]+", out)
    pids = [int(p) for p in re.findall(r"\(.*?pid (\d+)\)", out)]
    assert len(pids) == 2
    for pid in pids:  # the emulator and gunicorn are gone
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
