"""The control plane: off without a credential, bearer tokens compared exactly, banks only from under the
root (nothing revealed about the rest of the disk), every attempt audited, the served bank restored."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from forgetrt.runtime.errors import ArtifactError, InvalidInputError

from .conftest import TOKEN

LOAD = "/v2/repository/models/digits/load"


def _load(live, bank, token=TOKEN, headers=None):
    h = {"Authorization": f"Bearer {token}"} if token is not None else {}
    h.update(headers or {})
    body = {"parameters": {"bank": bank}} if not isinstance(bank, bytes) else None
    return httpx.post(
        f"{live.url}{LOAD}", json=body, content=bank if isinstance(bank, bytes) else None, headers=h, timeout=20
    )


@pytest.mark.parametrize(
    "body",
    [{"parameters": {"bank": "v2"}}, {"parameters": {"bank": "/etc"}}, {}, {"parameters": {}}, {"x": 1}],
)
@pytest.mark.parametrize("auth", [None, f"Bearer {TOKEN}", "Bearer nope"])
def test_without_a_credential_every_change_is_403(live_open, body, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.post(f"{live_open.url}{LOAD}", json=body, headers=headers, timeout=10)
    assert r.status_code == 403 and "disabled" in r.json()["error"]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer  " + TOKEN + "x",
        "Basic " + TOKEN,
        "Bearer " + TOKEN[:-1],
        "Bearer " + TOKEN + "x",
        "Bearer " + TOKEN.upper(),
        "bearer " + TOKEN[:10],
        "Token " + TOKEN,
        ("Bearer " + TOKEN + "\u00e9").encode("latin-1"),
    ],
)
def test_wrong_credentials_are_401(live, header):
    headers = {"Authorization": header} if header is not None else {}
    r = httpx.post(f"{live.url}{LOAD}", json={"parameters": {"bank": "v2"}}, headers=headers, timeout=10)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert live.runtime.snapshot.label != "v2"  # nothing changed


def test_bearer_scheme_is_case_insensitive(live):
    r = httpx.post(f"{live.url}{LOAD}", json={}, headers={"Authorization": f"bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200  # no bank named: only reports the version


OUTSIDE = [
    "/etc",
    "/etc/passwd",
    "/",
    "..",
    "../outside0/evil",
    "../../",
    "v2/../../",
    "escape",  # a symlink out of the root
    "nested/../../",
    "./../",
    "missing",
    "nested",  # a folder, not a bank
    "not-a-bank",
    "plain-file",
    "v2/manifest.json",
    "~/",
    "v2\x00",
    "%2e%2e/",
    "\\..\\",
    "x" * 5000,
]


@pytest.mark.parametrize("bank", OUTSIDE)
def test_paths_outside_the_root_or_not_banks_are_one_404(live, bank):
    r = _load(live, bank)
    assert r.status_code in (400, 404), r.text
    msg = r.json()["error"]
    if r.status_code == 404:  # one message whatever the reason: nothing about what exists outside the root
        assert msg == f"bank {bank[:100]!r} not found under the bank root"  # a long name is cut
    else:
        assert "parameters.bank" in msg


def test_dot_dot_is_refused_before_resolving_so_nothing_outside_is_probed(live, bank_root):
    """Resolving '..' would test every component on the way (/etc/passwd/.. fails, /etc/.. does not): a
    load that passes outside the root must fail the same way whether what it passes exists or not."""
    root = bank_root.name
    outside = next(p for p in bank_root.parent.iterdir() if p.name.startswith("outside"))
    probes = [
        f"../{root}/v2",  # back into the root: still refused
        f"../{outside.name}/evil/../../{root}/v2",  # passes through something that exists
        f"../no-such-folder/../{root}/v2",  # passes through something that does not
        "v2/../v2",
        "../../../etc/passwd/../../" + root + "/v2",
    ]
    for bank in probes:
        r = _load(live, bank)
        assert r.status_code == 404 and r.json()["error"] == f"bank {bank!r} not found under the bank root"
    assert _load(live, "nested/v3").status_code == 200  # plain names inside still load
    assert _load(live, "v2").status_code == 200


@pytest.mark.parametrize("bank", ["\ud800", "v2/\udfff", "\ud800/.."])
def test_bank_names_that_are_not_text_are_refused_cleanly(live, bank):
    # a lone surrogate, as JSON's \\u escape delivers it
    r = httpx.post(
        f"{live.url}{LOAD}",
        content=json.dumps({"parameters": {"bank": bank}}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 404 and "not found under the bank root" in r.json()["error"]


@pytest.mark.parametrize("bank", [5, None, ["v2"], {"a": "v2"}, True, ""])
def test_bank_parameter_must_be_a_name(live, bank):
    r = httpx.post(
        f"{live.url}{LOAD}",
        json={"parameters": {"bank": bank}},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    if bank is None:
        assert r.status_code == 200 and "bank_version" in r.json()  # no bank: only reports
    else:
        assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"parameters": 5}', b'{"parameters": []}', b"x" * (70 << 10)])
def test_bad_bodies_are_json_4xx(live, body):
    r = httpx.post(f"{live.url}{LOAD}", content=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_loads_inside_the_root_are_served_audited_and_persisted(live):
    before = live.runtime.snapshot.version
    for bank in ("v2", "nested/v3", "inner-link"):  # a symlink that stays inside the root is fine
        r = _load(live, bank)
        assert r.status_code == 200, r.text
        assert r.json()["bank_version"] == live.runtime.snapshot.version
    assert live.runtime.snapshot.version == before + 3
    state = json.loads((live.control.state_dir / "state.json").read_text())
    assert state["bank"] == "v2"  # inner-link resolves to v2
    audit = [json.loads(x) for x in (live.control.state_dir / "audit.jsonl").read_text().splitlines()]
    assert all({"time", "caller", "action", "bank", "outcome"} <= set(a) for a in audit)
    oks = [a for a in audit if a["outcome"] == "ok"]
    assert [a["bank"] for a in oks[-3:]] == ["v2", "nested/v3", "v2"] and all(a["vectors_sha256"] for a in oks)
    assert any(a["outcome"] == "refused" for a in audit)  # the refused attempts are on record too


def test_the_token_has_rules(tmp_path, bank_root):
    from forgetrt.runtime.control import ControlPlane

    with pytest.raises(InvalidInputError, match="at least 16"):
        ControlPlane("short", bank_root, tmp_path)
    with pytest.raises(InvalidInputError, match="needs --bank-root"):
        ControlPlane(TOKEN, None, tmp_path)
    with pytest.raises(ArtifactError, match="not a folder"):
        ControlPlane(TOKEN, tmp_path / "none", tmp_path)
    (tmp_path / "tok").write_text(TOKEN + "\n")
    assert ControlPlane.from_files(token_file=tmp_path / "tok", bank_root=bank_root, state_dir=tmp_path).token == TOKEN
    assert ControlPlane.from_files(env={"FORGETRT_ADMIN_TOKEN": TOKEN}, bank_root=bank_root, state_dir=tmp_path).enabled
    assert not ControlPlane.from_files(env={}).enabled
    with pytest.raises(ArtifactError, match="token file not found"):
        ControlPlane.from_files(token_file=tmp_path / "missing")


def test_a_token_file_that_is_not_text_is_a_typed_error(tmp_path, bank_root):
    from forgetrt.runtime.control import ControlPlane

    (tmp_path / "tok").write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(ArtifactError, match="cannot read the admin token file"):
        ControlPlane.from_files(token_file=tmp_path / "tok", bank_root=bank_root, state_dir=tmp_path / "s")


def test_a_state_dir_that_cannot_be_written_is_refused_at_start(tmp_path, bank_root):
    from forgetrt.runtime.control import ControlPlane

    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="cannot hold the audit log"):
        ControlPlane(TOKEN, bank_root, tmp_path / "file")  # a file, not a folder
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "audit.jsonl").mkdir()
    with pytest.raises(ArtifactError, match="cannot hold the audit log"):
        ControlPlane(TOKEN, bank_root, tmp_path / "s")


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_change_that_cannot_be_recorded_is_not_served(digits_bundle, digits_bank, tmp_path, monkeypatch, when):
    """The audit log or state file failing (before or after the swap) leaves the previous bank serving."""
    import numpy as np

    import forgetrt.runtime.control as control_mod
    from forgetrt.runtime import Runtime, RuntimeConfig, VectorBank
    from forgetrt.runtime.control import ControlPlane, RecordError

    bank = VectorBank.load(digits_bank[0])  # the bundle's vectors plus one more: a visible change
    extra = np.random.default_rng(0).normal(0, 0.01, bank.get("forget-0").shape).astype(np.float32)
    bank.add("extra", extra, forgets={"kind": "class", "classes": [1]}, recipe={"method": "test"})
    bank.save(tmp_path / "root" / "v2")
    control = ControlPlane(TOKEN, tmp_path / "root", tmp_path / "state")
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    try:
        names, matrix = rt.snapshot.names, np.array(rt.snapshot.matrix)
        x = np.full((1, 1, 8, 8), 0.5, np.float32)
        want = rt.infer(x, [names[0]]).logits
        if when == "before":
            (tmp_path / "state" / "audit.jsonl").unlink()
            (tmp_path / "state" / "audit.jsonl").mkdir()
        else:
            real = control_mod.atomic_write_json

            def failing(path, obj):
                if path.name == "state.json":
                    raise OSError(28, "No space left on device")
                return real(path, obj)

            monkeypatch.setattr(control_mod, "atomic_write_json", failing)
        with pytest.raises(RecordError, match="nothing changed" if when == "before" else "rolled back"):
            control.load_bank(rt, "v2", "test")
        assert rt.snapshot.names == names and np.array_equal(rt.snapshot.matrix, matrix)
        np.testing.assert_array_equal(rt.infer(x, [names[0]]).logits, want)
        assert not (tmp_path / "state" / "state.json").exists()
        monkeypatch.undo()
        if when == "before":
            (tmp_path / "state" / "audit.jsonl").rmdir()
        control.load_bank(rt, "v2", "test")  # recordable again: the same change goes through
        assert "extra" in rt.snapshot.names and (tmp_path / "state" / "state.json").is_file()
    finally:
        rt.close()


@pytest.mark.parametrize("damage", ["missing-bank", "changed-bank", "malformed-state"])
def test_the_server_refuses_to_start_on_an_unclear_bank_state(digits_bundle, digits_bank, tmp_path, damage):
    import shutil

    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.control import ControlPlane
    from forgetrt.runtime.server import create_app

    root, state = tmp_path / "root", tmp_path / "state"
    shutil.copytree(digits_bank[0], root / "b")
    control = ControlPlane(TOKEN, root, state)
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    try:
        control.load_bank(rt, "b", "test")
        if damage == "missing-bank":
            shutil.rmtree(root / "b")
        elif damage == "changed-bank":
            man = json.loads((root / "b" / "manifest.json").read_text())
            from forgetrt.runtime.bank import VectorBank

            bank = VectorBank.load(root / "b")
            bank.vectors[bank.names[0]] = bank.vectors[bank.names[0]] * 0.5
            bank.save()
            assert json.loads((root / "b" / "manifest.json").read_text())["vectors_sha256"] != man["vectors_sha256"]
        else:
            (state / "state.json").write_text("{}")
        with pytest.raises(ArtifactError):
            create_app(rt, "digits", control=ControlPlane(TOKEN, root, state))
    finally:
        rt.close()


def test_cli_serve_control_plane_flags_are_checked(tmp_path, digits_bundle):
    from click.testing import CliRunner

    from forgetrt.tools.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(digits_bundle), "--bank-root", str(tmp_path), "--device", "cpu"], env={})
    assert r.exit_code == 2 and "take effect with an admin token" in r.output
    (tmp_path / "tok").write_text("short\n")
    r = CliRunner().invoke(
        cli, ["serve", str(digits_bundle), "--admin-token-file", str(tmp_path / "tok"), "--device", "cpu"]
    )
    assert r.exit_code == 2 and "at least 16" in r.output
    (tmp_path / "tok").write_text(TOKEN)
    r = CliRunner().invoke(
        cli, ["serve", str(digits_bundle), "--admin-token-file", str(tmp_path / "tok"), "--device", "cpu"]
    )
    assert r.exit_code == 2 and "needs --bank-root" in r.output
    assert os.environ.get("FORGETRT_ADMIN_TOKEN") is None
