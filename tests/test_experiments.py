"""``tumorseg results``: DVC experiments as one readable table (changed params, each model's test
scores even where they are equal across rows, the data each row is on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tumorseg.cli import main

STAGE = '''import json, yaml
p = yaml.safe_load(open("params.yaml"))
json.dump({"dice": p["lr"] * 100, "iou": 0.5, "hd95": 3.0, "loss": 1.0}, open("metrics/evaluate_unet.json", "w"))
json.dump({"dice": 0.7, "iou": 0.6, "hd95": 4.25}, open("metrics/evaluate_umobilenetv2.json", "w"))
for m in ("unet", "umobilenetv2"):
    json.dump({"data_source": "synthetic", "model": m}, open(f"metrics/evaluate_{m}.info.json", "w"))
'''


def run(command: list[str], cwd: Path) -> None:
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, env=env, timeout=300)


@pytest.mark.slow  # two `dvc exp run`s (~15 s)
def test_results_table_of_experiments(tmp_path: Path, capsys):
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], tmp_path)
    run([*dvc, "init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("lr: 0.001\nepochs: 3\nmodels:\n  unet: {base: 32}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "stage.py").write_text(STAGE)
    stage = {
        "cmd": f"{sys.executable} stage.py",
        "deps": ["stage.py"],
        "params": ["lr", "epochs", "models.unet"],
        "outs": [{f"metrics/evaluate_{m}.info.json": {"cache": False}} for m in ("unet", "umobilenetv2")],
        "metrics": [{f"metrics/evaluate_{m}.json": {"cache": False}} for m in ("unet", "umobilenetv2")],
    }
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": {"evaluate": stage}}))  # JSON is YAML
    run([*dvc, "repro", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "baseline"], tmp_path)
    run([*dvc, "exp", "run", "-q", "-n", "faster", "-S", "lr=0.003"], tmp_path)
    run([*dvc, "exp", "run", "-q", "-n", "longer", "-S", "epochs=5", "-S", "lr=0.001"], tmp_path)

    assert main(["results", "--repo", str(tmp_path), "--models", "unet", "umobilenetv2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    # only the params that differ between rows; both models' scores, though umobilenetv2's never change
    assert header == ["experiment", "epochs", "lr", "unet dice", "unet iou", "unet hd95", "umobilenetv2 dice", "umobilenetv2 iou", "umobilenetv2 hd95", "data"]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert rows["faster"] == ["3", "0.0030", "0.3000", "0.5000", "3.0", "0.7000", "0.6000", "4.2", "synthetic"]
    assert rows["longer"][:3] == ["5", "0.0010", "0.1000"] and rows["master"][0] == "3"

    assert main(["results", "--repo", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path.parent / "plain").mkdir(exist_ok=True)
    assert main(["results", "--repo", str(tmp_path.parent / "plain")]) == 2
    err = capsys.readouterr().err
    assert "dvc exp show --json` failed" in err and "not inside of a DVC repository" in err
