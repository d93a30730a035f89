import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multidevice_check.py")


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1]), proc.returncode


def test_data_parallel_over_4_devices_matches_one_device(report):
    r, _ = report
    assert r["data4"]["mesh"] == {"data": 4, "model": 1}
    assert r["data4"]["max_abs_diff"] <= 1e-5
    assert r["data4"]["batch_sizes_multiple_of_data"]
    assert r["data4"]["qkv_w_shard_shape"] == [1, 32, 96]  # replicated


def test_2x2_data_by_model_matches_one_device(report):
    r, rc = report
    assert r["data2_model2"]["mesh"] == {"data": 2, "model": 2}
    assert r["data2_model2"]["max_abs_diff"] <= 1e-5
    assert r["data2_model2"]["qkv_w_shard_shape"] == [1, 32, 48]  # split along the output dim
    assert r["model4"]["max_abs_diff"] <= 1e-5 and r["model4"]["qkv_w_shard_shape"] == [1, 32, 24]
    assert rc == 0


def test_every_input_is_split_over_data(report):
    r, _ = report
    for name in ("data4", "data2_model2", "model4"):
        assert r[name]["input_specs"] == {"input_ids": "P('data',)", "mask": "P('data',)"}
    for name in ("rows_data4", "rows_data2_model2"):
        assert r[name]["input_specs"] == {"pixels": "P('data',)", "scale": "P('data',)"}


def test_fixed_shape_dict_outputs_over_4_devices_match_fn(report):
    r, rc = report
    assert r["rows_data4"]["mesh"] == {"data": 4, "model": 1}
    assert r["rows_data4"]["batch_sizes"] == [8, 4]  # 8, 4, 2 rounded up to the 4 data devices
    assert r["rows_data4"]["w1_shard_shape"] == [16, 8]  # replicated
    assert r["rows_data2_model2"]["batch_sizes"] == [8, 4, 2]
    assert r["rows_data2_model2"]["w1_shard_shape"] == [16, 4]  # split along the output dim
    for name in ("rows_data4", "rows_data2_model2"):
        assert r[name]["max_abs_diff"] <= 1e-5 and r[name]["labels_equal"]
    assert rc == 0
