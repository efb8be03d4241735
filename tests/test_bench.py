"""The benchmark a release's figures come from still runs (its figures are for docs/benchmarks.md, not
for tests: nothing here looks at a time)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def node_path(*args: str) -> str:
    command = [sys.executable, str(BENCH / "node_path.py"), "--items", "300", "--runs", "2", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_node_path_runs_both_modes_and_the_peer_in_the_same_runs():
    out = node_path()
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert list(rows) == ["mode", "concurrent", "pocketflow, the provider awaited directly", "batch"]
    assert re.search(r"\*\*[\d.]+\*\* \([\d.]+–[\d.]+\)", rows["concurrent"])  # median (range) of 2 runs
    assert re.search(r"concurrent path takes [\d.]+× pocketflow's", out)


def test_node_path_in_batch_mode_has_no_peer():
    assert "pocketflow" not in node_path("--mode", "batch")
