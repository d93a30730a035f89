"""Run by test_multidevice.py in a fresh process with 4 forced host devices (the flag must be set
before jax starts).  Prints one JSON line; exits non-zero if anything differs."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from bulkinfer.models import bert  # noqa: E402
from bulkinfer.runtime import Bucketing, Engine  # noqa: E402
from bulkinfer.testing import TINY_BERT_INPUTS, random_token_rows, tiny_bert  # noqa: E402

PIXELS = {"pixels": ((4, 4), "float32"), "scale": ((2,), "float32")}


def classify(params, batch):
    """{"logits": [B, 4], "label": [B] int32} from pixels [B, 4, 4] and scale [B, 2]."""
    x = batch["pixels"].reshape(batch["pixels"].shape[0], 16) * batch["scale"][:, :1]  # [B, 16]
    logits = jax.nn.relu(x @ params["w1"]) @ params["w2"] + batch["scale"][:, 1:]  # [B, 4]
    return {"logits": logits, "label": logits.argmax(-1).astype(np.int32)}


def classify_spec(path, leaf):
    """Megatron style: w1 [16, 8] split along its output dim, w2 [8, 4] along its input dim."""
    return {"w1": PartitionSpec(None, "model"), "w2": PartitionSpec("model", None)}[path[-1].key]


def input_specs(engine, batch, length):
    """The PartitionSpec of each batch input in the compiled executable, as strings."""
    _, batch_shardings = engine._executable(batch, length).input_shardings[0]
    return {name: str(s.spec) for name, s in sorted(batch_shardings.items())}


def main():
    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 forced host devices, got {len(devices)}"
    report = {}

    fn, params = tiny_bert(layers=1)
    rows = {"input_ids": random_token_rows(70, max_len=16, seed=3)}
    bucketing = Bucketing(lengths=(8, 16), token_budget=128, max_batch=16, ladder=1)
    one = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=bucketing, devices=devices[:1]).run(rows)["output"]
    for name, kwargs in {"data4": {}, "data2_model2": {"model_parallel": 2, "param_spec": bert.param_spec},
                         "model4": {"model_parallel": 4, "param_spec": bert.param_spec}}.items():
        engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=bucketing, devices=devices, **kwargs)
        out = engine.run(rows)["output"]
        qkv = engine._params["layers"]["qkv_w"]
        report[name] = {
            "mesh": engine.mesh_shape,
            "max_abs_diff": float(np.abs(out - one).max()),
            "qkv_w_shard_shape": list(qkv.addressable_shards[0].data.shape),
            "batch_sizes_multiple_of_data": all(
                b % engine.mesh_shape["data"] == 0 for b, _ in engine.bucketing.shapes()),
            "input_specs": input_specs(engine, *engine.bucketing.shapes()[0]),
        }

    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((16, 8)).astype(np.float32),
              "w2": rng.standard_normal((8, 4)).astype(np.float32)}
    images = {"pixels": rng.standard_normal((27, 4, 4)).astype(np.float32),
              "scale": rng.uniform(0.5, 2, (27, 2)).astype(np.float32)}
    direct = jax.jit(classify)(params, images)
    for name, kwargs in {"rows_data4": {}, "rows_data2_model2": {"model_parallel": 2, "param_spec": classify_spec}}.items():
        engine = Engine(classify, params, inputs=PIXELS, bucketing=Bucketing.for_rows(batch_size=8, ladder=2),
                        devices=devices, **kwargs)
        out = engine.run(images)
        report[name] = {
            "mesh": engine.mesh_shape,
            "max_abs_diff": float(np.abs(out["logits"] - np.asarray(direct["logits"])).max()),
            "labels_equal": bool((out["label"] == np.asarray(direct["label"])).all()),
            "w1_shard_shape": list(engine._params["w1"].addressable_shards[0].data.shape),
            "batch_sizes": [b for b, _ in engine.bucketing.shapes()],
            "input_specs": input_specs(engine, *engine.bucketing.shapes()[0]),
        }
    print(json.dumps(report))
    ok = all(r["max_abs_diff"] <= 1e-5 for r in report.values()) and all(
        r["labels_equal"] for k, r in report.items() if k.startswith("rows_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
