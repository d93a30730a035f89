"""JaxModel: a user's pure JAX function as a model, params from a pytree, safetensors or Orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bulkinfer
from bulkinfer.runtime import EngineStats
from bulkinfer.testing import TINY_CLASSIFIER_INPUTS, tiny_classifier, tiny_classifier_params

INPUTS = TINY_CLASSIFIER_INPUTS


def masked_sum(params, batch):
    """batch: {"ids": int32 [B, L], "mask": int32 [B, L]} -> float32 [B]: sum of w[id] over real positions."""
    return (params["w"][batch["ids"]] * batch["mask"]).sum(-1)


def per_token(params, batch):
    return params["w"][batch["ids"]]  # [B, L]: follows the variable axis


@pytest.fixture(scope="module")
def params():
    return tiny_classifier_params(0)


def direct(params, pixels):
    return jax.tree.map(np.asarray, jax.jit(tiny_classifier)(params, {"pixels": jnp.asarray(pixels)}))


def test_predict_matches_the_function_called_directly_for_every_tail_size(params):
    loaded = bulkinfer.JaxModel(tiny_classifier, params=params, inputs=INPUTS, batch_size=8).load()
    assert {o.name: (o.shape, o.dtype) for o in loaded.outputs} == {"score": ((2,), "float32"), "label": ((), "int32")}
    pixels = np.random.default_rng(1).standard_normal((29, 4, 3)).astype(np.float32)
    for n in (1, 3, 8, 9, 29):
        got = loaded.predict({"pixels": pixels[:n]})
        want = direct(params, pixels[:n])
        np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
        np.testing.assert_array_equal(got["label"], want["label"])
    stats = EngineStats()
    loaded.predict({"pixels": pixels}, stats=stats)
    assert stats.compiles == 0  # every shape on the ladder was compiled by the calls above
    assert loaded.predict({"pixels": pixels[:0]})["score"].shape == (0, 2)


def test_params_from_a_pytree_a_safetensors_file_and_an_orbax_directory_agree(params, tmp_path):
    import orbax.checkpoint as ocp

    from bulkinfer.models.safetensors_file import save_safetensors

    save_safetensors(params, tmp_path / "w.safetensors")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", params)
    checkpointer.wait_until_finished()
    pixels = np.random.default_rng(2).standard_normal((5, 4, 3)).astype(np.float32)
    want = direct(params, pixels)["score"]
    specs = [bulkinfer.JaxModel(tiny_classifier, params=p, inputs=INPUTS)
             for p in (params, str(tmp_path / "w.safetensors"), str(tmp_path / "orbax"))]
    for spec in specs:
        np.testing.assert_allclose(spec.load().predict({"pixels": pixels})["score"], want, atol=1e-6)
    assert specs[0] == bulkinfer.JaxModel(tiny_classifier, params=jax.tree.map(np.copy, params), inputs=INPUTS)
    assert hash(specs[0]) == hash(bulkinfer.JaxModel(tiny_classifier, params=jax.tree.map(np.copy, params), inputs=INPUTS))
    changed = jax.tree.map(np.copy, params)
    changed["dense"]["b"][0] += 1
    assert specs[0] != bulkinfer.JaxModel(tiny_classifier, params=changed, inputs=INPUTS)
    assert specs[0] != bulkinfer.JaxModel(tiny_classifier, params=params, inputs=INPUTS, batch_size=64)


def test_a_variable_axis_is_bucketed_and_masked():
    w = np.linspace(-1, 1, 50).astype(np.float32)
    spec = bulkinfer.JaxModel(masked_sum, params={"w": w}, inputs={"ids": ((None,), "int32")}, max_length=64,
                              token_budget=128, batch_size=16)
    loaded = spec.load()
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 50, size=k).astype(np.int32) for k in rng.integers(1, 64, size=40)]
    got = loaded.predict({"ids": rows})["output"]
    np.testing.assert_allclose(got, [w[r].sum() for r in rows], atol=1e-5)
    with pytest.raises(ValueError, match="longest bucket"):
        loaded.predict({"ids": [np.zeros(65, np.int32)]})


def test_bad_declarations_fail_when_the_spec_is_made():
    with pytest.raises(ValueError, match="'mask' is reserved"):
        bulkinfer.JaxModel(masked_sum, params={}, inputs={"mask": ((2,), "int32")})
    with pytest.raises(ValueError, match="expected \\(shape, dtype\\)"):
        bulkinfer.JaxModel(tiny_classifier, params={}, inputs={"pixels": (4, 3)})
    with pytest.raises(ValueError, match="tokenize text first"):
        bulkinfer.JaxModel(tiny_classifier, params={}, inputs={"text": ((), "string")})
    with pytest.raises(ValueError, match=r"max_in_flight >= 0 \(-1\)"):
        bulkinfer.JaxModel(tiny_classifier, params={}, inputs={"pixels": ((4, 3), "float32")}, max_in_flight=-1)
    spec = bulkinfer.JaxModel(per_token, params={"w": np.ones(5, np.float32)}, inputs={"ids": ((None,), "int32")})
    with pytest.raises(ValueError, match="output 'output' must be \\[B, ...\\] with a per-row shape"):
        spec.load()


def test_a_model_is_its_function_and_parameters_not_its_name():
    params = {"w": np.ones((12, 2), np.float32)}

    def scaled(k):
        return lambda p, batch: batch["pixels"].reshape(-1, 12) @ p["w"] * k

    same = [bulkinfer.JaxModel(scaled(2.0), params=params, inputs=INPUTS) for _ in range(2)]
    assert same[0] == same[1] and hash(same[0]) == hash(same[1]) and same[0].digest == same[1].digest
    other_closure = bulkinfer.JaxModel(scaled(3.0), params=params, inputs=INPUTS)
    other_body = bulkinfer.JaxModel(lambda p, batch: -(batch["pixels"].reshape(-1, 12) @ p["w"]), params=params,
                                    inputs=INPUTS)
    for other in (other_closure, other_body):
        assert other != same[0] and other.digest != same[0].digest
    pixels = np.ones((2, 4, 3), np.float32)
    assert other_closure.load().predict({"pixels": pixels})["output"][0, 0] == 36.0
    assert same[0].load().predict({"pixels": pixels})["output"][0, 0] == 24.0


def bf16_scores(params, batch):
    return (batch["pixels"].reshape(-1, 12) @ params["w"]).astype(jnp.bfloat16)  # [B, 2] bfloat16


def test_bfloat16_outputs_leave_the_model_as_float32():
    loaded = bulkinfer.JaxModel(bf16_scores, params={"w": np.ones((12, 2), np.float32)}, inputs=INPUTS).load()
    out = loaded.predict({"pixels": np.ones((3, 4, 3), np.float32)})["output"]
    assert out.dtype == np.float32 and loaded.outputs[0].dtype == "float32"
    np.testing.assert_array_equal(out, np.full((3, 2), 12.0, np.float32))


def test_a_batch_size_the_engine_cannot_use_fails_when_the_spec_is_made():
    with pytest.raises(ValueError, match="power of two"):
        bulkinfer.JaxModel(tiny_classifier, params={}, inputs=INPUTS, batch_size=100)


def test_a_function_that_does_not_fit_its_parameters_names_the_model_inputs_and_parameters():
    spec = bulkinfer.JaxModel(tiny_classifier, params={"dense": {"w": np.ones((12, 2), np.float32)}}, inputs=INPUTS,
                              name="mine")
    with pytest.raises(ValueError, match=r"model 'mine': fn\(params, batch\) fails on its declared inputs "
                                         r"\{'pixels': \(2, 4, 3\)\} with parameters \[\['dense'\]\['w'\]\]: KeyError"):
        spec.load()
