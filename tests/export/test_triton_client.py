"""Triton users keep names: `export triton` records the vectors, range, policies and mandatory weights,
and forgetrt.client turns names into coefficient rows with the runtime's own checks."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from forgetrt.client import Compositions
from forgetrt.runtime import Runtime, RuntimeConfig
from forgetrt.runtime.errors import InvalidInputError, UnknownNameError
from forgetrt.tools.cli import cli


@pytest.fixture(scope="module")
def triton_config(digits_bundle, tmp_path_factory):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path_factory.mktemp("triton")
    r = CliRunner().invoke(
        cli, ["export", "triton", "--bundle", str(digits_bundle), "--repo", str(repo), "--accept-clipping"]
    )
    assert r.exit_code == 0, r.output
    cfg = text_format.Parse((repo / digits_bundle.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    # the JSON Triton's GET /v2/models/NAME/config answers (field names as in the .proto)
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


def test_the_export_records_what_a_client_needs(triton_config, digits_bundle):
    p = triton_config["parameters"]
    assert p["forgetrt_coeff_range"]["string_value"] == "-2.0,2.0"
    assert json.loads(p["forgetrt_policies"]["string_value"]) == {
        "eu": {"forget-3": 1.0},
        "pair": {"forget-0": 1.0, "forget-3": 1.0},
    }
    assert json.loads(p["forgetrt_mandatory"]["string_value"]) == {"forget-9": 0.5}
    a, b = Compositions.from_model_config(triton_config), Compositions.from_bundle(digits_bundle)
    assert a.vectors == b.vectors and a.coeff_range == b.coeff_range == (-2.0, 2.0) and a.policies == b.policies
    assert a.mandatory == {"forget-9": 0.5}


def test_rows_match_the_runtimes_compositions(triton_config, digits_bundle):
    comp = Compositions.from_model_config({"config": triton_config})
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    asks = ["forget-3=1,forget-0=0.5", "eu", ["forget-1", "forget-2"], {"forget-7": -1.5}]
    by_name = [{"forget-3": 1.0, "forget-0": 0.5}, "eu", ["forget-1", "forget-2"], {"forget-7": -1.5}]
    rows = comp.rows(asks)
    assert rows.shape == (4, 9) and rows.dtype == np.float32
    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        got = rt.infer(x, coeffs=rows).logits
        for i, f in enumerate(by_name):
            np.testing.assert_allclose(got[i : i + 1], rt.infer(x[i : i + 1], f).logits, atol=1e-5)
    np.testing.assert_array_equal(comp.row(None), np.zeros(9, np.float32))


@pytest.mark.parametrize(
    "bad, err",
    [
        ("forget-3=2.5", "outside the bundle's coefficient range"),  # Triton's graph would clip this silently
        ("forget-9", "unknown vector"),  # mandatory: not selectable
        ("nope=1", "unknown vector"),
        ("forget-3=x", "must be a number"),
        ({"forget-3": float("nan")}, "finite"),
        (["forget-3", "forget-3"], "repeat"),
        ("forget-3=1,forget-3=1", "given twice"),
    ],
)
def test_rows_refuse_what_the_runtime_refuses(digits_bundle, bad, err):
    comp = Compositions.from_bundle(digits_bundle)
    with pytest.raises((InvalidInputError, UnknownNameError), match=err):
        comp.row(bad)


def test_malformed_configs_are_typed_errors():
    with pytest.raises(InvalidInputError, match="forgetrt_vectors"):
        Compositions.from_model_config({"name": "m", "parameters": {}})
    bad = {"parameters": {"forgetrt_vectors": {"string_value": "a,b"}, "forgetrt_coeff_range": {"string_value": "1"}}}
    with pytest.raises(InvalidInputError, match="coeff_range"):
        Compositions.from_model_config(bad)
    with pytest.raises(InvalidInputError, match="one composition per image"):
        Compositions(["a"]).rows("a")
