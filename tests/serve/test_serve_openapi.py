"""bulkinfer/serve/openapi.json matches the server: every route it answers is documented, every documented
operation answers, and the bearer token guards every documented route except /v2/health/*."""

from __future__ import annotations

import http.client
import json
import re
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkinfer.serve import ServeConfig, start

TOKEN = "s3cret"
DOC = json.loads(resources.files("bulkinfer.serve").joinpath("openapi.json").read_text(encoding="utf-8"))
VALID_INFER = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}).encode()


def _operations() -> list[tuple[str, str, dict]]:
    """(method, template, operation) for every operation in the document."""
    return [(m.upper(), path, op) for path, ops in DOC["paths"].items() for m, op in ops.items()]


def _concrete(template: str, model: str = "minilm") -> str:
    return template.replace("{model_name}", model).replace("{model_version}", "1")


def _template_of(path: str) -> str | None:
    """The document's path template that `path` (no query, no trailing slash) falls under, if any."""
    for template in DOC["paths"]:
        if re.fullmatch(re.sub(r"\{[^/}]+\}", "[^/]+", template), path):
            return template
    return None


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def token_server(embedder):
    srv = start(embedder, ServeConfig(port=0, token=TOKEN))
    yield srv
    srv.stop()


def test_document_is_openapi_3_with_a_bearer_scheme_and_the_v2_routes():
    assert DOC["openapi"].startswith("3.")
    assert DOC["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": DOC["components"]["securitySchemes"]["bearerAuth"]["description"]}
    assert DOC["security"] == [{"bearerAuth": []}]
    ops = {(m, t) for m, t, _ in _operations()}
    for want in [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"),
                 ("GET", "/v2/models/{model_name}"), ("GET", "/v2/models/{model_name}/ready"),
                 ("POST", "/v2/models/{model_name}/infer")]:
        assert want in ops
    infer = DOC["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    schemas = DOC["components"]["schemas"]
    assert schemas["InferenceRequest"]["required"] == ["inputs"]
    assert set(schemas["RequestInput"]["required"]) == {"name", "shape", "datatype"}
    for _, _, op in _operations():  # every operation documents its JSON error replies
        assert any(code.startswith("4") for code in op["responses"]), op["operationId"]


def test_every_documented_operation_answers(server):
    for method, template, _ in _operations():
        status, _ = _request(server.port, method, _concrete(template), VALID_INFER)
        assert status == 200, (method, template, status)


def _check_documented(port: int, method: str, path: str) -> int:
    """Asserts that `path`, if the server answers it with anything but 404, is in the document with `method`."""
    status, body = _request(port, method, path, VALID_INFER)
    if status != 404:
        template = _template_of(path)
        assert template is not None, f"{method} {path} answers {status} but is not in openapi.json"
        if status == 405:
            assert "takes" in json.loads(body)["error"]
        else:
            assert method.lower() in DOC["paths"][template], f"{method} {path} answers {status}; {template} lacks it"
    return status


def _route_grammar() -> list[str]:
    """Every path one step away from a v2 route: each route, its prefixes, and a wrong word in each place."""
    paths = ["/v2", "/v2/health", "/v2/models"] + [f"/v2/health/{w}" for w in ("live", "ready", "x")]
    for model in ("minilm", "other"):
        for version in ("", "/versions", "/versions/1", "/versions/x/y"):
            for tail in ("", "/ready", "/stats", "/infer", "/metadata", "/x", "/ready/x"):
                paths.append(f"/v2/models/{model}{version}{tail}")
    return paths


def test_every_route_the_server_answers_is_documented(server):
    statuses = {(m, p): _check_documented(server.port, m, p) for p in _route_grammar() for m in ("GET", "POST")}
    reached = {(m, _template_of(p)) for (m, p), status in statuses.items() if status not in (404, 405)}
    assert reached == {(m, t) for m, t, _ in _operations()}  # and the probes reached every documented operation


# Paths made of the words the v2 routes use, plus a few that no route uses, in any order.
_WORDS = ["v2", "health", "live", "ready", "models", "minilm", "other", "versions", "1", "infer", "stats",
          "metadata", "..", "%2e%2e", "v1"]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(_WORDS), max_size=6), method=st.sampled_from(["GET", "POST"]))
def test_no_undocumented_route_among_random_paths(server, words, method):
    _check_documented(server.port, method, "/" + "/".join(words))


@pytest.mark.parametrize("method, template", [(m, t) for m, t, _ in _operations()])
def test_the_token_guards_every_documented_route_but_health(token_server, method, template):
    op = DOC["paths"][template][method.lower()]
    public = op.get("security", DOC["security"]) == []
    assert public == template.startswith("/v2/health/")  # the document says which routes are public
    port, path = token_server.port, _concrete(template)
    for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        status, body = _request(port, method, path, VALID_INFER, headers)
        if public:
            assert status == 200, (headers, status)
        else:
            assert status == 401, (headers, status)
            assert "bearer token" in json.loads(body)["error"]
    # An unknown model is 401 too, not 404: without the token, nothing about the models leaks.
    if "{model_name}" in template and not public:
        assert _request(port, method, _concrete(template, "nope"), VALID_INFER)[0] == 401
    for scheme in ("Bearer", "bearer"):  # the scheme name is case-insensitive (RFC 9110)
        status, _ = _request(port, method, path, VALID_INFER, {"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200, scheme
