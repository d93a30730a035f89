"""v2 tensors for any signature, without a server: inputs checked against TensorSpecs, outputs of every
datatype encoded and decoded (JSON and binary, BF16 included), and signatures read from metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkinfer.models.signature import TensorSpec
from bulkinfer.serve import protocol
from bulkinfer.serve.protocol import ProtocolError
from bulkinfer.serve.remote_model import signature_from_metadata


def _response(tensors: list[tuple[str, str, object, bool]]) -> tuple[bytes, str]:
    """An infer response body holding each (name, datatype, values, binary?) output, and its header length."""
    outputs, tails = [], []
    for name, datatype, values, binary in tensors:
        tensor, raw = protocol.encode_tensor(name, datatype, values, binary=binary)
        outputs.append(tensor)
        tails.append(raw)
    header = protocol.join({"outputs": outputs})
    return header + b"".join(tails), str(len(header))


@pytest.mark.parametrize("binary", [True, False])
def test_several_outputs_of_different_datatypes_round_trip(binary):
    label = np.array([3, -1, 7], np.int32)
    count = np.array([2**40, 0, -5], np.int64)
    probs = (np.arange(6, dtype=np.float32).reshape(3, 2) / 7).astype(np.float32)
    flags = np.array([True, False, True])
    names = np.array(["é", "", "b 🙂"], dtype=object)
    body, length = _response([("label", "INT32", label, binary), ("count", "INT64", count, not binary),
                              ("probs", "FP32", probs, binary), ("flags", "BOOL", flags, binary),
                              ("names", "BYTES", names, binary)])
    got = protocol.decode_outputs(body, length)
    assert list(got) == ["label", "count", "probs", "flags", "names"]
    for want, name in ((label, "label"), (count, "count"), (probs, "probs"), (flags, "flags"), (names, "names")):
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)
    assert list(protocol.decode_outputs(body, length, ["probs"])) == ["probs"]
    with pytest.raises(ProtocolError, match="no output 'logits'"):
        protocol.decode_outputs(body, length, ["logits"])


def test_bf16_rounds_to_nearest_even_and_decodes_exactly():
    values = np.array([1.5, -2.0, 3.140625, 1 + 2**-8, 1 + 3 * 2**-8, np.inf], np.float32)
    body, length = _response([("h", "BF16", values, True)])
    got = protocol.decode_outputs(body, length)["h"]
    assert got.dtype == np.float32
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to the even one, 1; 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(got, [1.5, -2.0, 3.140625, 1.0, 1 + 2**-6, np.inf])
    spec = TensorSpec("h", (2,), "bfloat16")
    tensor, raw = protocol.encode_tensor("h", "BF16", got[:4].reshape(2, 2), binary=True)
    decoded, rows = protocol.decode_tensor(tensor, memoryview(raw), spec)
    assert rows == 2 and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, got[:4].reshape(2, 2))


def _request(*tensors: dict) -> dict:
    return {"inputs": list(tensors)}


def test_decode_inputs_gives_the_forms_predict_takes():
    specs = (TensorSpec("text", (), "string"), TensorSpec("ids", (None,), "int64"), TensorSpec("m", (2, 2), "float32"))
    request = _request({"name": "ids", "datatype": "INT64", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]},
                       {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["a", "b"]},
                       {"name": "m", "datatype": "FP32", "shape": [2, 2, 2], "data": list(range(8))})
    values, n = protocol.decode_inputs(request, memoryview(b""), specs)
    assert n == 2 and values["text"] == ["a", "b"]
    assert isinstance(values["ids"], list) and [v.tolist() for v in values["ids"]] == [[1, 2, 3], [4, 5, 6]]
    assert values["ids"][0].dtype == np.int64
    assert values["m"].dtype == np.float32 and values["m"].shape == (2, 2, 2)  # ints taken as FP32 numbers


@pytest.mark.parametrize("tensor, message", [
    ({"name": "f", "datatype": "BOOL", "shape": [1], "data": [1]}, "element 0 is 1; BOOL elements in JSON must be true or false"),
    ({"name": "i", "datatype": "INT64", "shape": [1], "data": [2**63]}, "does not fit INT64"),
    ({"name": "i", "datatype": "INT64", "shape": [1], "data": [True]}, "element 0 is True; INT64 elements in JSON must be integers"),
    ({"name": "i", "datatype": "INT64", "shape": [1, 1], "data": [1]}, "input 'i' has shape [1, 1]; expected [N]"),
    ({"name": "v", "datatype": "INT64", "shape": [2, 0], "data": []}, "variable axis must be at least 1 long"),
])
def test_decode_tensor_rejects_json_of_the_wrong_kind(tensor, message):
    shape = (None,) if tensor["name"] == "v" else ()
    spec = TensorSpec(tensor["name"], shape, {"BOOL": "bool", "INT64": "int64"}[tensor["datatype"]])
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        protocol.decode_tensor(tensor, None, spec)


def test_signature_from_metadata_maps_datatypes_and_variable_axes():
    meta = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]},
                       {"name": "ids", "datatype": "INT32", "shape": [-1, -1]},
                       {"name": "img", "datatype": "UINT8", "shape": [-1, 4, 4, 3]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    inputs, wire = signature_from_metadata(meta, "inputs", "model 'm'")
    assert inputs == (TensorSpec("text", (), "string"), TensorSpec("ids", (None,), "int32"),
                      TensorSpec("img", (4, 4, 3), "uint8"))
    assert wire == {"text": [1]}  # sent as [N, 1], the shape the server declared
    assert signature_from_metadata(meta, "outputs", "model 'm'")[0] == (TensorSpec("label", (), "int64"),)


@pytest.mark.parametrize("tensor, message", [
    ({"name": "u", "datatype": "UINT32", "shape": [-1]}, "input 'u' has datatype 'UINT32'; RemoteModel takes"),
    ({"name": "x", "datatype": "FP32", "shape": [3, 4]}, "needs a batch axis first"),
    ({"name": "x", "datatype": "FP32", "shape": [-1, -1, -1]}, "model 'm': tensor 'x': shape"),
    ({"name": "t", "datatype": "BYTES", "shape": [-1, 2]}, "one string per row"),
])
def test_signature_from_metadata_refuses_what_a_model_cannot_have(tensor, message):
    with pytest.raises(ValueError, match=message):
        signature_from_metadata({"inputs": [tensor]}, "inputs", "model 'm'")


def test_encode_infer_request_asks_for_every_output_when_none_are_named():
    tensor, raw = protocol.encode_tensor("x", "FP32", np.ones((2, 3), np.float32), binary=True)
    header, tail = protocol.encode_request([tensor], raw, None)
    obj = json.loads(header)
    assert obj["parameters"] == {"binary_data_output": True} and "outputs" not in obj
    assert obj["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]
    assert tail == np.ones((2, 3), "<f4").tobytes()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)
_dims = st.integers(-2, 4) | st.sampled_from([2**31, 2**63, 10**20])
PAIR = (TensorSpec("x", (3,), "float32"), TensorSpec("tokens", (None,), "int32"), TensorSpec("text", (), "string"))


@st.composite
def _numeric_request(draw) -> tuple[dict, bytes]:
    """A near-valid request for PAIR's inputs: each tensor right, or wrong in a field or two, JSON or binary."""
    tensors, tail, n = [], b"", draw(st.integers(0, 3))
    for spec in PAIR:
        if spec.dtype == "string":
            values = draw(st.lists(st.text(max_size=5), min_size=n, max_size=n))
            t = {"name": spec.name, "datatype": "BYTES", "shape": [n], "data": values}
        else:
            shape = [n, *(draw(st.integers(1, 3)) if d is None else d for d in spec.shape)]
            array = np.arange(int(np.prod(shape)), dtype=spec.dtype).reshape(shape)
            t = {"name": spec.name, "datatype": spec.v2_datatype, "shape": shape}
            if draw(st.booleans()):
                raw = array.tobytes()
                t["parameters"] = {"binary_data_size": len(raw) + draw(st.sampled_from([0, 0, -1, 3]))}
                tail += raw
            else:
                t["data"] = array.tolist()
        for _ in range(draw(st.integers(0, 2))):
            field = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters", "drop"]))
            if field == "name":
                t["name"] = draw(st.sampled_from(["x", "tokens", "text", "y"]) | _json)
            elif field == "datatype":
                t["datatype"] = draw(st.sampled_from(["FP32", "INT32", "INT64", "BF16", "BOOL", "BYTES"]) | _json)
            elif field == "shape":
                t["shape"] = draw(st.lists(_dims, max_size=3) | _json)
            elif field == "data":
                t["data"] = draw(st.lists(_json, max_size=6) | _json)
            elif field == "parameters":
                t["parameters"] = draw(st.fixed_dictionaries({"binary_data_size": _dims}) | _json)
            else:
                t.pop(draw(st.sampled_from(sorted(t))))
        tensors.append(t)
    return {"inputs": draw(st.permutations(tensors))}, tail


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_numeric_request())
def test_decode_inputs_returns_the_signature_or_a_protocol_error(request_tail):
    request, tail = request_tail
    try:
        values, n = protocol.decode_inputs(request, memoryview(tail), PAIR)
    except ProtocolError as e:
        assert e.status == 400 and str(e) and len(str(e)) < 2000
        return
    assert set(values) == {"x", "tokens", "text"}
    assert values["x"].dtype == np.float32 and values["x"].shape == (n, 3)
    assert len(values["tokens"]) == n and all(v.dtype == np.int32 and v.ndim == 1 and v.size for v in values["tokens"])
    assert len(values["text"]) == n and all(isinstance(v, str) for v in values["text"])
