"""Run by test_multidevice.py in a fresh process with 4 forced host devices (the flag must be set
before jax starts).  Prints one JSON line; exits non-zero if anything differs."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bulkinfer.models import bert  # noqa: E402
from bulkinfer.runtime import Bucketing, Engine  # noqa: E402
from bulkinfer.testing import random_token_rows, tiny_bert  # noqa: E402


def main():
    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 forced host devices, got {len(devices)}"
    fn, params = tiny_bert(layers=1)
    rows = random_token_rows(70, max_len=16, seed=3)
    bucketing = Bucketing(lengths=(8, 16), token_budget=128, max_batch=16, ladder=1)
    one = Engine(fn, params, bucketing=bucketing, devices=devices[:1]).run(rows)
    report = {}
    for name, kwargs in {"data4": {}, "data2_model2": {"model_parallel": 2, "param_spec": bert.param_spec},
                         "model4": {"model_parallel": 4, "param_spec": bert.param_spec}}.items():
        engine = Engine(fn, params, bucketing=bucketing, devices=devices, **kwargs)
        out = engine.run(rows)
        qkv = engine._params["layers"]["qkv_w"]
        report[name] = {
            "mesh": engine.mesh_shape,
            "max_abs_diff": float(np.abs(out - one).max()),
            "qkv_w_shard_shape": list(qkv.addressable_shards[0].data.shape),
            "batch_sizes_multiple_of_data": all(
                b % engine.mesh_shape["data"] == 0 for b, _ in engine.bucketing.shapes()),
        }
    print(json.dumps(report))
    return 0 if all(r["max_abs_diff"] <= 1e-5 for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
