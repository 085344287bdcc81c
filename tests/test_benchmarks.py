"""The benchmark suite's cheapest pieces at tiny sizes: result schema and correctness, no timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PROJECT_ROOT, TINY_UNET

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

import common  # noqa: E402
from run import BENCHMARKS, write_summary  # noqa: E402


def _payload(name: str, body: dict) -> dict:
    import time

    return common.result_payload(name, quick=True, started=time.perf_counter(), load_start=common.load_average(), body=body)


def _check_common_fields(payload: dict) -> None:
    assert {"benchmark", "quick", "load_avg_1m", "load_avg_1m_end", "quiet_machine", "seconds", "machine", "ratios", "notes"} <= payload.keys()
    machine = payload["machine"]
    assert {"cpu_model", "cores", "ram_gib", "python", "versions", "load_avg_start", "date", "git"} <= machine.keys()
    assert machine["cores"] >= 1 and len(machine["load_avg_start"]) == 3 and "keras" in machine["versions"]
    for item in payload["ratios"]:
        assert isinstance(item["what"], str) and isinstance(item["value"], float)
        if "target" in item:
            assert isinstance(item["meets_target"], bool)
    json.dumps(payload)  # serialisable as it stands


def test_quiet_machine_flag_and_note():
    assert common.is_quiet(0.0) and not common.is_quiet(1000.0)
    loaded = common.result_payload("x", quick=True, started=0.0, load_start=[1000.0, 0, 0], body={})
    assert loaded["quiet_machine"] is False and any("NOT a valid timing" in n for n in loaded["notes"])


def _spin_seconds(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="ForeignCpu reads /proc/stat (Linux)")
def test_foreign_cpu_counts_other_processes_but_not_our_own_work():
    import time

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    with common.ForeignCpu() as own:  # our own busy loop is not foreign, nor a forkserver pool's work
        spin(0.3)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
            list(pool.map(_spin_seconds, [0.5, 0.5]))
    # a process that is not ours: orphaned at once (its shell parent exits), it spins while we sleep
    spinner = "import time\nend = time.perf_counter() + 1.2\nwhile time.perf_counter() < end: pass"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{spinner}" &'], check=True)
    with common.ForeignCpu() as foreign:
        time.sleep(0.8)
    time.sleep(0.5)  # let it finish
    # other processes of the test machine add noise: compare, with margins, rather than expect zero
    assert own.fraction is not None and foreign.fraction is not None
    assert foreign.fraction > own.fraction + 0.5 / common.cores() * 0.6, (own.fraction, foreign.fraction)
    payload = common.result_payload("x", quick=True, started=0.0, load_start=[0.0, 0, 0], body={}, foreign=foreign)
    assert payload["foreign_cpu_fraction"] == foreign.fraction and payload["quiet_machine"] == foreign.quiet


def test_ratio_target_logic():
    assert common.ratio("a", 6.0, target=5.0)["meets_target"] is True
    assert common.ratio("b", 0.5, target=0.1, higher_is_better=False)["meets_target"] is False
    assert "target" not in common.ratio("c", 1.0)


def test_peer_requirements_pin_our_tensorflow():
    from bench_train_step import peer_requirements, tensorflow_version

    requirements = peer_requirements()
    assert f"tensorflow-cpu=={tensorflow_version()}" in requirements
    assert any(r.startswith("segmentation-models") for r in requirements)
    assert any(r.startswith("tf-keras==" + ".".join(tensorflow_version().split(".")[:2])) for r in requirements)


@pytest.fixture(scope="module")
def data_results() -> dict[str, dict]:
    from bench_data import augment_benchmark, prepare_benchmark

    # 70 pairs: enough for prepare to use its process pool on a multi-core machine
    prepare = prepare_benchmark(quick=True, count=70, in_size=64, out_size=32, repeats=1)
    augment = augment_benchmark(quick=True, count=6, size=32, copies=1, repeats=1)
    return {"prepare": _payload("prepare", prepare), "augment": _payload("augment", augment)}


def test_prepare_benchmark_fields_and_identical_outputs(data_results):
    result = data_results["prepare"]
    _check_common_fields(result)
    assert set(result["pairs_per_s"]) == {"naive", "ours_all_cores", "ours_one_process"}
    assert all(v > 0 for v in result["pairs_per_s"].values())
    # our prepare stage resizes exactly as the naive cv2 loop does
    assert result["outputs_identical_to_naive"] == {"images": 1.0, "masks": 1.0}
    assert result["ratios"][0]["target"] == 5.0 and result["profile_one_process_top"]


def test_augment_benchmark_fields(data_results):
    result = data_results["augment"]
    _check_common_fields(result)
    assert set(result["augmented_pairs_per_s"]) == {"naive", "ours"}
    assert result["ratios"][0]["what"].startswith("augment")


@pytest.mark.slow
def test_train_step_ours_tiny():
    from bench_train_step import train_step_benchmark

    body = train_step_benchmark(quick=True, sizes=[32], warmup=[1], steps=[2], models={"unet": TINY_UNET}, peer=False)
    _check_common_fields(_payload("train_step", body))
    fused, unfused = body["rows"]  # the default (fused BatchNorm) and Keras' own, same process
    assert [fused["batch_norm"], unfused["batch_norm"]] == ["fused BN", "unfused BN"]
    for row in (fused, unfused):
        assert row["model"] == "unet" and row["side"] == "ours" and row["size"] == 32 and row["n"] == 2
        assert row["ms_per_step_per_million_params"] == pytest.approx(row["median_ms"] / (row["params_total"] / 1e6), rel=1e-3)
    assert body["threads"]["inter_op"] == 2
    (saving,) = body["ratios"]  # no peer: only what fusing saved
    assert saving["what"] == "train step 32², unet: fused / unfused BatchNorm, ms/step"
    assert saving["value"] == pytest.approx(fused["median_ms"] / unfused["median_ms"], abs=1e-3)


@pytest.mark.slow
def test_inference_tiny():
    from bench_inference import inference_benchmark

    body = inference_benchmark(quick=True, size=32, n_images=8, repeats=1, models={"unet": TINY_UNET}, matmul_n=128, latency_script=False)
    _check_common_fields(_payload("inference", body))
    paths = {r["path"]: r for r in body["rows"]}
    assert len(paths) == 7 and paths["naive model.predict per image"]["speedup_vs_naive"] == 1.0
    assert body["rows"][0]["gflops_per_image"] > 0 and body["matmul_peak"]["gflops"] > 0
    assert all(r["achieved_gflops"] > 0 for r in body["rows"])
    assert len(body["ratios"]) == 4


@pytest.mark.slow
def test_input_pipeline_tiny():
    from bench_input_pipeline import input_pipeline_benchmark

    body = input_pipeline_benchmark(quick=True, size=32, count=16, epochs=2, model="unet", overrides=TINY_UNET, thread_sweep=False)
    _check_common_fields(_payload("input_pipeline", body))
    assert set(body["epoch_seconds_median"]) == {"real, no online augment", "cached, no online augment", "real, online augment", "cached, online augment"}
    assert body["steps_per_epoch"] == 2 and len(body["ratios"]) == 2


def test_rss_wrapper_records_the_peak_of_the_command(tmp_path: Path):
    from bench_pipeline import WRAPPER

    (tmp_path / "rss_wrap.py").write_text(WRAPPER)
    command = [sys.executable, "rss_wrap.py", "big", "--", sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"]
    subprocess.run(command, cwd=tmp_path, check=True)
    (record,) = [json.loads(line) for line in (tmp_path / "rss.jsonl").read_text().splitlines()]
    assert record["stage"] == "big" and record["exit_code"] == 0 and record["peak_rss_mib"] >= 200


def test_summary_lists_every_ratio_and_the_machine(data_results, tmp_path: Path):
    from tumorseg.io import atomic_write_json

    for name, payload in data_results.items():
        atomic_write_json(tmp_path / f"{name}.json", payload)
    machine = common.machine_info()
    text = write_summary(tmp_path, machine).read_text()
    assert machine["cpu_model"] in text and "load average at start" in text
    for payload in data_results.values():
        for item in payload["ratios"]:
            assert item["what"] in text
    assert set(data_results) <= set(BENCHMARKS)
