import json

import pytest
import torch

from forgetrt.runtime import IOSpec
from forgetrt.runtime.architectures import create_model, is_external, list_models, model_input_shape
from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError, InvalidInputError, UnknownNameError
from forgetrt.runtime.model_folder import ModelManifest, load_model, read_model_manifest, save_model


def _spec(arch):
    c, h, w = model_input_shape(arch)
    return IOSpec(shape=(c, h, w), mean=(0.5,) * c, std=(0.25,) * c, labels=tuple(str(i) for i in range(10)))


@pytest.mark.parametrize("arch", sorted(a for a in list_models() if not is_external(a)))
def test_registry_forward_and_roundtrip(arch, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, _spec(arch)).eval()
    x = torch.rand(2, *model_input_shape(arch))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    info = save_model(tmp_path / arch, model, arch=arch, iospec=_spec(arch), metrics={"test_acc": 1.0})
    loaded, info2 = load_model(tmp_path / arch)
    assert info2 == info and info2.metrics == {"test_acc": 1.0} and info2.path == tmp_path / arch
    assert read_model_manifest(tmp_path / arch) == info
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)


def test_normalization_is_the_first_layer():
    m = create_model("digits-cnn", _spec("digits-cnn"))
    assert type(m[0]).__name__ == "Normalize"
    torch.testing.assert_close(m[0](torch.full((1, 1, 8, 8), 0.75)), torch.ones(1, 1, 8, 8))


def test_resnet18_cifar_is_the_paper_variant():
    m = create_model("resnet18-cifar", _spec("resnet18-cifar"))
    stem = m[1].stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert 11_000_000 < sum(p.numel() for p in m.parameters()) < 11_300_000


def test_model_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown arch 'vgg'; valid: .*digits-cnn"):
        create_model("vgg", _spec("digits-cnn"))
    with pytest.raises(InvalidInputError, match="takes input"):
        create_model("resnet18-cifar", _spec("digits-cnn"))
    with pytest.raises(ArtifactError, match="not found"):
        load_model(tmp_path / "none")
    m = create_model("digits-cnn", _spec("digits-cnn"))
    save_model(tmp_path / "m", m, arch="digits-cnn", iospec=_spec("digits-cnn"))
    wfile = tmp_path / "m" / "model.safetensors"
    raw = wfile.read_bytes()
    wfile.write_bytes(raw[:100])
    with pytest.raises(CorruptArtifactError, match="cannot read the model .* weights"):
        load_model(tmp_path / "m")
    # valid file, different weights: the fingerprint check catches it
    other = create_model("digits-cnn", _spec("digits-cnn"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wfile))
    with pytest.raises(CorruptArtifactError, match="fingerprint"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{")
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(CorruptArtifactError, match="not a ForgetRT model"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(
        json.dumps({"kind": "forgetrt.model", "schema_version": 1, "iospec": {}})
    )
    with pytest.raises(CorruptArtifactError, match="lacks or mangles field"):
        read_model_manifest(tmp_path / "m")


def test_manifest_roundtrip_without_torch_objects():
    m = ModelManifest(
        "digits-cnn", _spec("digits-cnn"), "ab" * 32, data="digits", training={"epochs": 3}, unlearning={"method": "rl"}
    )
    assert ModelManifest.from_dict(m.to_dict()) == m
    assert "path" not in m.to_dict()


def test_bundle_and_model_folder_share_one_loader(digits_bundle, tmp_path):
    """A bundle's classifier goes through the model folder's loader: same fingerprint check, same errors."""
    import shutil

    from forgetrt.runtime.bundle import Bundle

    b = Bundle.load(digits_bundle)
    module = b.load_classifier("cpu")
    assert b.classifier_manifest().fingerprint == b.fingerprint
    assert sum(p.numel() for p in module.parameters()) > 0
    copy = tmp_path / "bundle"
    shutil.copytree(digits_bundle, copy)
    other = create_model("digits-cnn", b.iospec)
    from safetensors.torch import save as save_bytes

    from forgetrt.runtime.bundle import CLASSIFIER_WEIGHTS, add_bundle_file
    from forgetrt.runtime.errors import MismatchError

    # the bundle checks its classifier's fingerprint at load (no torch needed), before anyone builds it
    with pytest.raises(MismatchError, match="do not name the same model"):
        add_bundle_file(
            Bundle.load(copy),
            CLASSIFIER_WEIGHTS,
            save_bytes({k: v.contiguous() for k, v in other.state_dict().items()}),
        )
