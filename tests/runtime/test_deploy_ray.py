"""Scale-out on Ray Serve (runtime/deploy.py): two CPU replicas on a local Ray instance behind Ray's HTTP
proxy, the KServe v2 routes, a cluster-wide hot swap under load (nothing sent after the acknowledgement
is answered with the old bank), a replica killed under load (its replacement serves the acknowledged
bank), and the coordinator's lease protocol on its own (no Ray)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from forgetrt.runtime.deploy import BankCoordinator, ClusterConfig, ScaleConfig
from forgetrt.runtime.errors import ArtifactError, InvalidInputError

TOKEN = "cluster-admin-token-0123456789"
APP = "forgetrt-test"
# A replica renews its lease once per poll and must apply a change it hears of before the lease it took at
# least a poll earlier runs out (0.9 lease - poll), or it answers 503 until it has. At 2 s the hot-swap test
# failed in 4 of 15 runs on a slow 2-core machine (AVX2 EPYC, 2026-12-07) with the Ray cluster and the load
# on it: instrumented, no poll was slow; the replica refused for lack of a lease taken 1.85 s earlier, just
# before it had applied the new bank. The default lease is 5 s. At 4 s, 1 of 10 runs of this file still
# failed (cause not captured); the hot-swap test now also allows a few such "retry" refusals, never a
# wrong or other failed answer.
LEASE_S = 4.0


# --------------------------------------------------------------------------- the protocol, without Ray


def test_ack_waits_for_replicas_on_the_old_bank_until_they_apply_or_their_lease_lapses(tmp_path):
    async def scenario():
        c = BankCoordinator(str(tmp_path), lease_s=0.4)
        assert (await c.poll("a", 0, 0))["lease_for"] == 0
        assert (await c.poll("b", 0, 0))["lease_for"] == 0

        async def replica_a_applies():  # a long-polls, sees the change, applies it, polls again
            st = await c.poll("a", 0, 5.0)
            assert st["generation"] == 1
            await asyncio.sleep(0.05)
            assert (await c.poll("a", 1, 0))["lease_for"] is None  # the right number, not the bank's hash
            assert (await c.poll("a", 1, 0, "abc"))["lease_for"] == 1

        task = asyncio.create_task(replica_a_applies())
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        res = await c.propose("v2", "abc", "test")  # b never answers: the ack waits for b's lease to lapse
        waited = time.monotonic() - t0
        await task
        return res, waited

    res, waited = asyncio.run(scenario())
    assert res["generation"] == 1 and res["replicas_confirmed"] == ["a"]
    assert 0.3 < waited < 2.0, waited
    # a restarted coordinator does not know the leases its predecessor granted: it acknowledges nothing
    # until any of them could still be running (one lease after it starts)
    restarted = BankCoordinator(str(tmp_path / "other"), lease_s=0.5)
    t0 = time.monotonic()
    asyncio.run(restarted.propose("v3", "def", "test"))
    assert time.monotonic() - t0 >= 0.45
    # a replica on an older generation gets no lease: it must apply first
    c2 = BankCoordinator(str(tmp_path), lease_s=1.0)  # restarted: restores generation 1 from the state dir
    assert c2.state() == {"generation": 1, "bank": "v2", "vectors_sha256": "abc"}
    assert asyncio.run(c2.poll("late", 0, 0))["lease_for"] is None
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["outcome"] for a in audit] == ["published", "acknowledged"]
    assert audit[1]["replicas"] == 1
    # the state file gone while the audit log records changes: refusing beats silently serving the
    # bundle's bank again under reused version numbers
    (tmp_path / "cluster-state.json").unlink()
    with pytest.raises(ArtifactError, match="refusing to start"):
        BankCoordinator(str(tmp_path), lease_s=1.0)


def test_scale_and_cluster_configs_are_checked():
    with pytest.raises(InvalidInputError):
        ScaleConfig(replicas=0)
    with pytest.raises(InvalidInputError):
        ScaleConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(InvalidInputError):
        ClusterConfig(lease_s=1.0, poll_s=1.0)
    auto = ScaleConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8, gpus_per_replica=1)
    opts = auto.deployment_options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert opts["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in opts
    assert ScaleConfig(replicas=3).deployment_options()["num_replicas"] == 3


def test_a_replica_stops_before_the_lease_the_coordinator_counts_and_refuses_without_one(monkeypatch):
    """The replica's side of the lease, without Ray: its lease runs from when it *sent* the poll, for 0.9 of
    the coordinator's lease (so it always stops first), only for a poll that granted one; without a lease
    it refuses with the reason, and a poll that failed leaves the old lease to run out, never renews it."""
    ray = pytest.importorskip("ray", reason="needs the 'ray' extra")
    from forgetrt.runtime.deploy import ForgetRTReplica

    clock = [100.0]
    monkeypatch.setattr("forgetrt.runtime.deploy.time.monotonic", lambda: clock[0])
    answers: list = []

    class _Poll:
        def remote(self, replica, applied, wait_s, sha):
            clock[0] += 1.5  # the long poll takes 1.5 s; the lease counts from before it
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    class _Coordinator:
        poll = _Poll()

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    rep = object.__new__(ForgetRTReplica)
    rep.replica, rep.cluster, rep.coordinator = "r0", ClusterConfig(lease_s=4.0, poll_s=1.0), _Coordinator()
    rep.applied, rep.applied_sha, rep.lease_until, rep.last_error = 0, None, 0.0, None
    rep.last_contact = clock[0]
    state = {"generation": 0, "bank": None, "vectors_sha256": None}

    assert "holds no current bank lease" in rep.admission()
    answers.append({**state, "lease_for": 0})
    rep._sync_once(wait_s=1.0)  # sent at 100, answered at 101.5
    assert rep.lease_until == pytest.approx(100.0 + 0.9 * 4.0)
    assert rep.admission() is None
    answers.append({**state, "lease_for": None})  # no lease granted (e.g. a bank it has not applied)
    rep._sync_once(wait_s=1.0)  # sent at 101.5: the lease it holds is not extended
    assert rep.lease_until == pytest.approx(103.6)
    clock[0] = 103.6
    assert "holds no current bank lease" in rep.admission()
    answers.append(ray.exceptions.GetTimeoutError("coordinator slow"))
    with pytest.raises(ray.exceptions.GetTimeoutError):
        rep._sync_once(wait_s=1.0)
    assert rep.lease_until == pytest.approx(103.6) and rep.last_contact == pytest.approx(101.5 + 1.5)


# --------------------------------------------------------------------------- a local Ray cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(digits_bundle, digits_bank, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="needs the 'ray' extra")
    import httpx
    import ray

    from forgetrt.runtime import RuntimeConfig
    from forgetrt.runtime.deploy import deploy, shutdown

    root = tmp_path_factory.mktemp("cluster-banks")
    shutil.copytree(digits_bank[0], root / "v2")
    shutil.copytree(digits_bank[0], root / "v3")
    state = tmp_path_factory.mktemp("cluster-state")
    ray.init(num_cpus=4, include_dashboard=False, namespace="forgetrt", log_to_driver=False)
    port = _free_port()
    try:
        url = deploy(
            str(digits_bundle),
            RuntimeConfig(backend="onnxruntime", device="cpu"),
            {"threads": 1},
            scale=ScaleConfig(replicas=2, cpus_per_replica=0.5),
            cluster=ClusterConfig(lease_s=LEASE_S, poll_s=0.5),
            port=port,
            app_name=APP,
            token=TOKEN,
            bank_root=str(root),
            state_dir=str(state),
        )
        with httpx.Client(base_url=url, timeout=30) as client:
            yield {"client": client, "url": url, "root": root, "state": state, "ray": ray}
    finally:
        try:
            shutdown(APP)
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def _body(forget: str = "forget-3", seed: int = 0) -> dict:
    x = np.random.default_rng(seed).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    return {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}],
        "parameters": {"forget": forget},
    }


def _load(cluster, bank: str, token: str = TOKEN):
    return cluster["client"].post(
        "/v2/repository/models/digits/load",
        json={"parameters": {"bank": bank}},
        headers={"Authorization": f"Bearer {token}"},
    )


def test_replicas_answer_the_kserve_routes_with_the_runtimes_logits(cluster, digits_bundle):
    from forgetrt.runtime import Runtime, RuntimeConfig

    c = cluster["client"]
    assert c.get("/v2/health/ready").json() == {"ready": True}
    meta = c.get("/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["outputs"][0]["shape"] == [-1, 10]
    seen, versions = set(), set()
    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        for i in range(24):
            body = _body(seed=i)
            r = c.post("/v2/models/digits/infer", json=body)
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-forgetrt-instance"])
            versions.add(r.json()["parameters"]["bank_version"])
            x = np.asarray(body["inputs"][0]["data"], np.float32).reshape(1, 1, 8, 8)
            want = rt.infer(x, ["forget-3"]).logits
            np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(1, 10), want, atol=1e-5)
    assert len(seen) == 2, seen  # both replicas served
    assert len(versions) == 1
    r = c.post("/v2/models/nope/infer", json=_body())
    assert r.status_code == 404 and "error" in r.json()


def test_bank_changes_are_refused_without_the_token_or_outside_the_root(cluster):
    assert _load(cluster, "v2", token="wrong-token-wrong-token").status_code == 401
    r = _load(cluster, "../v2")
    assert r.status_code == 404 and "error" in r.json()
    r = _load(cluster, "missing")
    assert r.status_code == 404
    audit = [json.loads(x) for x in (cluster["state"] / "audit.jsonl").read_text().splitlines()]
    assert any(a["outcome"] == "refused" and a["bank"] == "missing" for a in audit)


def _load_generator(cluster, stop: threading.Event, out: list, seed: int) -> None:
    import httpx

    with httpx.Client(base_url=cluster["url"], timeout=30) as c:
        i = 0
        while not stop.is_set():
            t_send = time.monotonic()
            try:
                r = c.post("/v2/models/digits/infer", json=_body(seed=seed * 1000 + i))
                version = r.json().get("parameters", {}).get("bank_version") if r.status_code == 200 else None
                out.append((t_send, r.status_code, version, r.headers.get("x-forgetrt-instance"), r.text[:200]))
            except httpx.HTTPError as e:
                out.append((t_send, -1, None, None, repr(e)))
            i += 1


def _under_load(cluster, action, *, clients: int = 3, before_s: float = 0.5, after_s: float = 1.5):
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load_generator, args=(cluster, stop, results, k)) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(before_s)
        value = action()
        t_done = time.monotonic()
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return value, t_done, results


def test_hot_swap_under_load_reaches_every_replica_before_it_is_acknowledged(cluster):
    before = cluster["client"].get("/v2/models/digits").json()  # noqa: F841 - routes warm
    resp, t_ack, results = _under_load(cluster, lambda: _load(cluster, "v2"))
    assert resp.status_code == 200, resp.text
    new = resp.json()["bank_version"]
    assert new >= 1
    after = [r for r in results if r[0] > t_ack]
    assert len(after) > 10 and len(results) > 20
    # a replica slower to apply the change than its lease margin answers 503 "retry" meanwhile (by design,
    # see LEASE_S); anything else must be a 200, and the refusals few
    refused = [r for r in results if r[1] == 503 and "holds no current bank lease" in r[4]]
    assert all(r[1] == 200 for r in results if r not in refused), [r for r in results if r[1] != 200][:3]
    assert len(refused) <= 6, refused[:3]
    assert {r[2] for r in after} == {new}, sorted({(r[2], r[3]) for r in after})
    assert len({r[3] for r in after}) == 2  # both replicas answered after the change, both with it
    coord = cluster["ray"].get_actor(f"{APP}-bank-coordinator", namespace="forgetrt")
    leases = cluster["ray"].get(coord.replicas.remote())
    assert {v["generation"] for v in leases.values()} == {new}


def test_a_killed_replica_is_replaced_and_its_successor_serves_the_acknowledged_bank(cluster):
    ray = cluster["ray"]
    resp = _load(cluster, "v3")
    assert resp.status_code == 200, resp.text
    acked = resp.json()["bank_version"]
    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}")
    ]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    _, t_kill, results = _under_load(cluster, lambda: ray.kill(victim, no_restart=True), after_s=1.0)
    # in flight on the killed replica: an error answer (never a wrong one, never a hang); the rest 200
    ok = [r for r in results if r[1] == 200]
    assert ok and {r[2] for r in ok} == {acked}
    failed = [r for r in results if r[1] != 200]
    assert len(failed) <= 3 * 2, failed  # at most the requests in flight on the killed replica
    # Ray Serve starts a replacement; it must come up on the acknowledged bank, not the bundle's
    deadline = time.monotonic() + 60
    instances = set()
    while time.monotonic() < deadline:
        r = cluster["client"].post("/v2/models/digits/infer", json=_body())
        if r.status_code == 200:
            assert r.json()["parameters"]["bank_version"] == acked
            instances.add(r.headers["x-forgetrt-instance"])
        live = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}")
        ]
        if len(instances) >= 2 and len(live) == 2 and replicas[0]["name"] not in {a["name"] for a in live}:
            break
        time.sleep(0.1)
    assert len(instances) >= 2, instances


def test_replicas_cut_off_from_the_coordinator_stop_serving_within_a_lease(cluster):
    """Last (it breaks the cluster): with the coordinator gone no bank change can be acknowledged, and a
    replica that cannot hear about one must not keep answering: 503 with a reason once its lease lapses."""
    ray = cluster["ray"]
    coord = ray.get_actor(f"{APP}-bank-coordinator", namespace="forgetrt")
    ray.kill(coord, no_restart=True)  # asynchronous: t0 is when the coordinator is known to be gone
    while True:
        try:
            ray.get(coord.state.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.01)
    t0 = time.monotonic()
    deadline = t0 + 15
    while time.monotonic() < deadline:
        r = cluster["client"].post("/v2/models/digits/infer", json=_body())
        if r.status_code == 503:
            break
        assert r.status_code == 200
        time.sleep(0.05)
    assert r.status_code == 503 and "bank lease" in r.json()["error"], r.text
    # The replicas' leases lapse at different times (each one's last poll began at its own moment), so a
    # run of refusals can come from one replica while the other still holds a lease. Every lease was taken
    # by a poll sent before the kill took effect and so ends by then + 0.9 lease: from the kill + a lease
    # on, every answer from every replica must be refused (and before 3 leases, when Ray Serve's health
    # check starts replacing replicas out of contact).
    while time.monotonic() < t0 + LEASE_S:
        time.sleep(0.05)
    codes, seen = [], set()
    for _ in range(20):
        for r in (
            cluster["client"].get("/v2/health/ready"),
            cluster["client"].post("/v2/models/digits/infer", json=_body()),
        ):
            codes.append(r.status_code)
            seen.add(r.headers.get("x-forgetrt-instance"))
            assert r.status_code != 503 or "bank lease" in r.text, r.text
    assert time.monotonic() - t0 < 3 * LEASE_S
    assert codes == [503] * len(codes), codes
    assert len(seen) == 2 and None not in seen, seen  # both replicas answered, and both refused
