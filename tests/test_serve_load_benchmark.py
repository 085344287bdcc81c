"""benchmarks/serve_load.py in a smoke size: the real server in a child process, a few uploads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import PROJECT_ROOT

MODEL = PROJECT_ROOT / "weights" / "umobilenetv2-figshare.keras"


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is missing (the benchmark would build one: too slow for a test)")
def test_serve_load_smoke(tmp_path):
    out = tmp_path / "serve_load.json"
    command = [
        sys.executable, str(PROJECT_ROOT / "benchmarks" / "serve_load.py"),
        "--requests", "6", "--concurrency", "2", "--bad-fraction", "0.5", "--scenarios", "mixed", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mixed |" in done.stdout

    result = json.loads(out.read_text())
    assert result["benchmark"] == "serve_load" and result["quick"] is True
    assert {"machine", "foreign_cpu_fraction", "quiet_machine", "settings", "data_source", "scenarios"} <= result.keys()
    assert result["settings"]["server"] == {"command": "tumorseg serve --model M --port P", "workers": 1, "queue_limit": 8, "retry_after_s": 5}
    (name,) = result["scenarios"]
    mixed = result["scenarios"][name]
    assert mixed["uploads"] == 6 and mixed["server"]["alive_after_load"]
    normal = mixed["by_kind"]["normal"]
    assert normal["uploads"] == 3 and normal["final"]["200"] == 3 and normal["latency_ms_200"]["n"] == 3
    bad = {kind: row for kind, row in mixed["by_kind"].items() if kind != "normal"}
    assert len(bad) == 3 and all(row["final_status_codes"] == {"422": 1} for row in bad.values())
    memory = mixed["memory_mib"]
    assert 0 < memory["before"] <= memory["peak"] and memory["after"] > 0 and memory["samples"] > 0
