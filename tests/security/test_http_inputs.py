"""Every malformed or hostile request gets a JSON 4xx (never a 500 or plain text), is counted in /metrics,
and the server keeps answering good requests correctly."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

IMG = np.full((1, 1, 8, 8), 0.5, np.float32)


def _img(**over):
    t = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": IMG.ravel().tolist()}
    t.update(over)
    return t


def _body(inputs=None, **extra):
    return json.dumps({"inputs": [_img()] if inputs is None else inputs, **extra}).encode()


def _coeffs(rows, shape=None, dtype="FP32"):
    rows = np.asarray(rows, np.float32)
    return {"name": "coeffs", "shape": shape or list(rows.shape), "datatype": dtype, "data": rows.ravel().tolist()}


BAD_JSON = [
    b"",
    b"{",
    b"[",
    b"nul",
    b'{"inputs": [}',
    b"\xff\xfe",
    b'{"a": 1,}',
    b"{'inputs': []}",
    b"123abc",
    b'"\\ud800"',
]
NOT_OBJECT = [b"[]", b"1", b'"text"', b"null", b"true"]
INPUTS = [
    {},
    {"inputs": None},
    {"inputs": []},
    {"inputs": {}},
    {"inputs": "image"},
    {"inputs": [1]},
    {"inputs": [None]},
    {"inputs": [[]]},
    {"inputs": [_img(name=None)]},
    {"inputs": [_img(name=5)]},
    {"inputs": [_img(), _img()]},
    {"inputs": [_img(name="other")]},
    {"inputs": [_img(name="coeffs")]},
    {"inputs": [_img(shape=None)]},
    {"inputs": [_img(shape="1,1,8,8")]},
    {"inputs": [_img(shape=[1, 1, 8, -8])]},
    {"inputs": [_img(shape=[True, 1, 8, 8])]},
    {"inputs": [_img(shape=[1.0, 1, 8, 8])]},
    {"inputs": [_img(shape=[2**40, 1, 8, 8])]},
    {"inputs": [_img(shape=[2**31 - 1] * 8)]},
    {"inputs": [_img(shape=[1] * 9)]},
    {"inputs": [_img(shape=[1, 1, 8, 8, 1])]},
    {"inputs": [_img(shape=[64])]},
    {"inputs": [_img(datatype="FP8")]},
    {"inputs": [_img(datatype=None)]},
    {"inputs": [_img(datatype=["FP32"])]},
    {"inputs": [_img(data=None)]},
    {"inputs": [_img(data="abc")]},
    {"inputs": [_img(data=[[1, 2], [3]])]},
    {"inputs": [_img(data=[0.5] * 63)]},
    {"inputs": [_img(data=[10**400] + [0] * 63)]},
    {"inputs": [_img(data=[{"a": 1}] * 64)]},
    {"inputs": [_img(data=[2.0] * 64)]},
    {"inputs": [_img(data=[-0.5] * 64)]},
    {"inputs": [_img(datatype="INT64", data=[1] * 64)]},
    {"inputs": [_img(datatype="UINT8", data=[300] * 64)]},
    {"inputs": [_img(shape=[1, 8, 8], data=[0.5] * 64)]},
    {"inputs": [_img(shape=[0, 1, 8, 8], data=[])]},
    {"inputs": [_img(shape=[1, 3, 8, 8], data=[0.5] * 192)]},
    {"inputs": [_img(shape=[65, 1, 8, 8], data=[0.5] * 65 * 64)]},
    {"inputs": [_img(parameters="x")]},
    {"inputs": [_img(), _coeffs([[0] * 8])]},
    {"inputs": [_img(), _coeffs([[0] * 9], dtype="FP64")]},
    {"inputs": [_img(), _coeffs([0] * 9)]},
    {"inputs": [_img(), _coeffs([[0] * 9, [0] * 9])]},
    {"inputs": [_img(), _coeffs([[5.0] + [0] * 8])]},
    {"inputs": [_img(), _coeffs([[0] * 9])], "parameters": {"forget": ["forget-1"]}},
    {"inputs": [_img(), _img(name="extra")]},
    {"inputs": [_img()] * 9},
    {"inputs": [_img(data=["0.5"] * 64)]},  # numbers only: numpy would read the strings as floats
    {"inputs": [_img(data=[True] * 64)]},
    {"inputs": [_img(), _coeffs([[0] * 9], dtype="INT32") | {"data": [0.5] + [0] * 8}]},
]
PARAMS = [
    "x",
    1,
    [],
    {"forget": 5},
    {"forget": True},
    {"forget": [1, 2]},
    {"forget": [None]},
    {"forget": {"forget-1": "1"}},
    {"forget": {"forget-1": None}},
    {"forget": {"forget-1": True}},
    {"forget": {"forget-1": [1]}},
    {"forget": {"forget-1": 1e39}},
    {"forget": {"forget-1": -1e39}},
    {"forget": {"forget-1": 3.0}},
    {"forget": {"nope": 1.0}},
    {"forget": ["forget-9"]},
    {"forget": ["forget-1", "forget-1"]},
    {"forget": "{bad json"},
    {"forget": "[" * 5000 + "]" * 5000},
    {"forget": '{"forget-1": "x"}'},
    {"forget": "nope,forget-1"},
    {"policy": 5},
    {"policy": ["eu"]},
    {"policy": "nope"},
    {"policy": "forget-1"},
    {"forget": ["forget-1"], "policy": "eu"},
    {"binary_data_output": "yes"},
    {"binary_data_output": 1},
    {"forget": "forget-1=abc"},
    {"forget": "forget-1=inf"},
    {"forget": "forget-1=nan"},
    {"forget": "=1"},
    {"forget": "forget-1=1,forget-1=0.5"},
    {"forget": "forget-1=3"},  # outside the bundle's coefficient range
    {"forget": " , "},
    {"priority": 3},
    {"timeout": -1},
    {"timeout": "10"},
    {"timeout": 1.5},
    {"sequence_id": 7},
    {"an_unknown_parameter": 1},
    {"forget": {"forget-1": 10**400}},  # an integer no float holds
    {"forget": '{"forget-1": ' + "1" * 5000 + "}"},  # past Python's integer digit limit
]
FIELDS = [
    {"id": 5},
    {"id": ["a"]},
    {"id": {"a": 1}},
    {"id": True},
    {"id": 1.5},
    {"outputs": "logits"},
    {"outputs": [1]},
    {"outputs": [{"name": "nope"}]},
    {"outputs": [{"name": None}]},
    {"outputs": [{"name": "logits", "parameters": "x"}]},
    {"outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]},
    {"outputs": [{"name": "logits"}, {"name": "probs"}]},
    {"outputs": [{"name": "logits"}, {"name": "logits"}]},
    {"outputs": [{"name": "logits", "parameters": {"classification": 11}}]},  # more classes than the model has
    {"outputs": [{"name": "logits", "parameters": {"classification": -1}}]},
    {"outputs": [{"name": "logits", "parameters": {"classification": "3"}}]},
    {"outputs": [{"name": "logits", "parameters": {"shm_region": "x"}}]},
    {"outputs": {}},
    {"id": "\ud800"},  # a lone surrogate: valid JSON escape, not text
    {"id": "x" * 2000},
]


def _binary_cases():
    raw = IMG.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    hl = "inference-header-content-length"
    cases = [
        (head + raw, {hl: v})
        for v in ("x", "-1", "0", str(len(head) + len(raw) + 1), "1e3", "", f"+{len(head)}", "1_00")
    ]
    cases.append((head + raw + b"\0" * 8, {hl: str(len(head))}))
    cases.append((head + raw[:-4], {hl: str(len(head))}))
    for size in (-1, True, "256", 2.5, 10**30, 12):
        h = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": size},
                    }
                ]
            }
        ).encode()
        cases.append((h + raw, {hl: str(len(h))}))
    nan = np.full((1, 1, 8, 8), np.nan, np.float32).tobytes()
    cases.append((head + nan, {hl: str(len(head))}))
    inf = np.full((1, 1, 8, 8), np.inf, np.float32).tobytes()
    cases.append((head + inf, {hl: str(len(head))}))
    return cases


CASES = (
    [(b, {}) for b in BAD_JSON]
    + [(b, {}) for b in NOT_OBJECT]
    + [(json.dumps(c).encode(), {}) for c in INPUTS]
    + [(_body(parameters=p), {}) for p in PARAMS]
    + [(_body(**f), {}) for f in FIELDS]
    + _binary_cases()
    + [(b"[" * d + b"]" * d, {}) for d in (33, 1000, 200_000)]
    + [
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
        (b'{"inputs": [' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"]}", {}),
    ]
    + [
        (_body(parameters={"forget": "x" * 300_000}), {}),
        (json.dumps({"inputs": [_img(name="n" * 500_000)]}).encode(), {}),
    ]
    + [  # JSON in UTF-16: a character whose bytes contain '"' would hide the nesting from a byte scan
        (
            ('{"inputs": [' + json.dumps(_img()) + '], "y": "\u2200", "x": ' + "[" * 500 + "]" * 500 + "}").encode(enc),
            {},
        )
        for enc in ("utf-16", "utf-16-le", "utf-32")
    ]
    + [(b'{"id": "a\\", "inputs": [' + json.dumps(_img()).encode() + b'], "x": ' + b"[" * 40 + b"]" * 40 + b"}", {})]
    + [
        (
            b'{"inputs": [{"name": "image", "shape": [1,1,8,8], "datatype": "FP32", "data": [NaN'
            + b",0.5" * 63
            + b"]}]}",
            {},
        )
    ]
    + [
        (
            b'{"inputs": [{"name": "image", "shape": [1,1,8,8], "datatype": "FP32", "data": [Infinity'
            + b",0.5" * 63
            + b"]}]}",
            {},
        )
    ]
)


@pytest.mark.parametrize("body, headers", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_malformed_request_is_a_counted_json_4xx(live, body, headers):
    r = httpx.post(f"{live.url}/v2/models/digits/infer", content=body, headers=headers, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json") and "error" in r.json()


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("GET", "/v2/models/digits/infer", 405),
        ("PUT", "/v2/models/digits/infer", 405),
        ("DELETE", "/v2/repository/models/digits/load", 405),
        ("POST", "/v2/models/other/infer", 404),
        ("POST", "/v2/models/digits/versions/2/infer", 404),
        ("GET", "/v2/models/other", 404),
        ("GET", "/v2/models/" + "x" * 5000, 404),
        ("POST", "/v2/health/live", 405),
        ("GET", "/v2/models/digits/versions/1/ready/extra", 404),
        ("POST", "/v2/models/digits/infer/", 404),  # no redirect (to a Host the client names)
        ("GET", "/v2/", 404),
        ("GET", "/metrics/", 404),
        ("PUT", "/v2/repository/models/digits/load/", 404),
    ],
)
def test_routing_errors_are_json(live, method, path, status):
    r = httpx.request(method, f"{live.url}{path}", content=b"{}", headers={"host": "evil.example"}, timeout=10)
    assert r.status_code == status and "error" in r.json()


def test_failures_are_counted_and_the_server_still_serves(live, torch_reference):
    httpx.post(f"{live.url}/v2/models/digits/infer", content=b"{", timeout=10)
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert 'forgetrt_http_responses_total{route="/v2/models/{model}/infer",status="400"}' in text
    assert 'status="404"' in text and 'status="405"' in text
    assert 'forgetrt_request_failures_total{error="InvalidInputError"}' in text
    body = _body(parameters={"forget": {"forget-3": 1.0}}, id="ok-1")
    r = httpx.post(f"{live.url}/v2/models/digits/infer", content=body, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "ok-1"
    want = torch_reference(IMG, np.eye(9, dtype=np.float32)[3][None])
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(1, 10), want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "datatype, data, ok",
    [
        ("FP32", [0.5, 1], True),
        ("FP32", [1, 2], True),  # integers are numbers
        ("FP32", ["0.5", "1"], False),
        ("FP32", [True, False], False),
        ("FP32", [1e39, 0], False),  # beyond float32
        ("FP64", [1e39, 0], True),
        ("INT32", [1, 2], True),
        ("INT32", [0.5, 1], False),  # would truncate to 0
        ("INT32", [2**31, 0], False),  # would wrap
        ("UINT8", [255, 0], True),
        ("UINT8", [256, 0], False),
        ("UINT8", [-1, 0], False),
        ("INT64", [2**63, 0], False),
        ("FP16", [70000.0, 0], False),
    ],
)
def test_data_must_be_numbers_the_datatype_holds(datatype, data, ok):
    from forgetrt.runtime.errors import InvalidInputError
    from forgetrt.runtime.server import _tensors

    req = {"inputs": [{"name": "x", "shape": [2], "datatype": datatype, "data": data}]}
    if ok:
        np.testing.assert_array_equal(_tensors(req, b"", 100)["x"], np.asarray(data))
    else:
        with pytest.raises(InvalidInputError, match="data is not"):
            _tensors(req, b"", 100)


def test_the_depth_scan_skips_strings_with_escapes():
    from forgetrt.runtime.server import _json_depth_ok

    assert not _json_depth_ok('{"a": "x\\n", "b": [[[[1]]]]}', 4)  # an escape inside a string
    assert _json_depth_ok('{"a": "x\\n", "b": [[[1]]]}', 4)
    assert not _json_depth_ok('{"a": "\\\\", "b": [[[[]]]]}', 4)  # an escaped backslash ends the string
    assert _json_depth_ok('{"a": "[[[[[[[[[[\\"]]]"}', 1)  # brackets and escaped quotes inside a string
