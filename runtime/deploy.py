"""Scale-out: the runtime as a Ray Serve deployment (``forgetrt serve --ray``).

Each replica is a Ray actor holding its own :class:`~forgetrt.runtime.Runtime` (on a GPU when the
deployment asks for one per replica), behind Ray Serve's HTTP proxy, answering the same KServe v2 routes
as ``forgetrt serve``. The replica count is fixed or autoscaled by Ray Serve on ongoing requests per
replica (queue depth).

Bank changes are cluster-wide and acknowledged only once no replica can answer with an older bank:

* One **coordinator** actor holds the served bank's *generation* (0 = the bundle's own bank), its
  folder under the bank root and its sha256, and persists it (``state_dir/cluster-state.json``, with
  every attempt in ``audit.jsonl``), so a restarted coordinator, and every replica started later,
  serves the acknowledged bank.
* Every replica long-polls the coordinator. A poll from a replica that has applied the current
  generation renews its **lease** (``lease_s``, measured by the replica from *before* it sent the poll,
  so it never outlives the coordinator's record of it). A replica answers inference only while its lease
  is valid; otherwise 503 (and it turns unready), so a replica cut off from the coordinator stops
  serving on its own.
* ``POST /v2/repository/models/NAME/load`` on any replica checks the token and the bank (the same
  checks every replica runs: path under the root, hashes, model binding, mandatory-vector cancellation),
  then asks the coordinator to publish the next generation. The coordinator answers once every
  replica holding a lease on an older generation has applied the new one or seen its lease run out
  (at most ``lease_s``). Responses name the generation as ``bank_version``.

Multi-node: start Ray on every machine (``ray start --head`` on one, ``ray start --address HEAD:6379``
on the others), make the bundle and bank root readable at the same path on each (shared storage), and
run ``forgetrt serve BUNDLE --ray --ray-address auto`` on the head. Replicas refuse a bundle whose id
differs from the one the driver loaded.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .control import BankLoadRefused, ControlPlane, RecordError
from .errors import ArtifactError, ForgetRTError, InvalidInputError, MismatchError
from .files import atomic_write_json, read_json
from .limits import ServerLimits
from .runtime import RuntimeConfig

__all__ = [
    "ScaleConfig",
    "ClusterConfig",
    "BankCoordinator",
    "ForgetRTReplica",
    "deploy",
    "shutdown",
    "NAMESPACE",
]

log = logging.getLogger("forgetrt.deploy")

NAMESPACE = "forgetrt"
STATE_FILE = "cluster-state.json"


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, and what each one reserves. ``max_replicas`` set: Ray Serve autoscales between
    ``min_replicas`` and it, aiming at ``target_ongoing_requests`` requests queued or running per replica."""

    replicas: int = field(default=2, metadata={"help": "Ray: replicas (fixed count; see --max-replicas) [default: 2]."})
    min_replicas: int = field(default=1, metadata={"help": "Ray: fewest replicas when autoscaling [default: 1]."})
    max_replicas: int | None = field(
        default=None, metadata={"help": "Ray: autoscale on queue depth between --min-replicas and this."}
    )
    target_ongoing_requests: float = field(
        default=16.0,
        metadata={"help": "Ray: requests queued or running per replica that autoscaling aims at [default: 16]."},
    )
    gpus_per_replica: float = field(
        default=0.0, metadata={"help": "Ray: GPUs each replica reserves (1: one GPU each) [default: 0]."}
    )
    cpus_per_replica: float = field(default=1.0, metadata={"help": "Ray: CPUs each replica reserves [default: 1]."})
    max_ongoing_requests: int = field(
        default=256, metadata={"help": "Ray: requests one replica takes at once; more wait in Ray [default: 256]."}
    )

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidInputError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidInputError(
                f"autoscaling needs 1 <= min_replicas <= max_replicas, got {self.min_replicas}..{self.max_replicas}"
            )
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise InvalidInputError("target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise InvalidInputError("gpus_per_replica and cpus_per_replica must be >= 0")

    def deployment_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.max_replicas is None:
            opts["num_replicas"] = self.replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return opts


@dataclass(frozen=True)
class ClusterConfig:
    """The bank protocol's timing: a replica's lease, and how long one long poll waits for a change."""

    lease_s: float = field(
        default=5.0,
        metadata={"help": "Ray: seconds a replica may serve without hearing from the bank coordinator [default: 5]."},
    )
    poll_s: float = field(default=1.0, metadata={"help": "Ray: seconds one bank long-poll waits [default: 1]."})

    def __post_init__(self) -> None:
        if not 0 < self.poll_s < self.lease_s:
            raise InvalidInputError(f"need 0 < poll_s < lease_s, got poll {self.poll_s}, lease {self.lease_s}")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------------------ coordinator


class BankCoordinator:
    """The cluster's record of the served bank (a Ray async actor; see the module docstring)."""

    def __init__(self, state_dir: str | None, lease_s: float) -> None:
        self.lease_s = lease_s
        self.state_dir = Path(state_dir) if state_dir else None
        self.generation, self.bank, self.sha = 0, None, None
        self.leases: dict[str, tuple[int, float]] = {}  # replica -> (generation, expiry on this clock)
        # leases granted by an earlier incarnation (before a restart) are unknown here but last at most
        # lease_s: no change is acknowledged before they have all run out
        self.not_before = time.monotonic() + lease_s
        self._changed: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        if self.state_dir is not None and (self.state_dir / STATE_FILE).is_file():
            st = read_json(self.state_dir / STATE_FILE, "cluster bank state")
            self.generation, self.bank, self.sha = int(st["generation"]), st["bank"], st["vectors_sha256"]
        elif self.state_dir is not None and (self.state_dir / "audit.jsonl").is_file():
            log_text = (self.state_dir / "audit.jsonl").read_text(errors="replace")
            if '"outcome": "acknowledged"' in log_text or '"outcome": "published"' in log_text:
                raise ArtifactError(
                    f"{self.state_dir / STATE_FILE} is missing but the audit log records bank changes: refusing to "
                    "start at the bundle's own bank (restore the state file, or use a new state dir)"
                )

    def _events(self) -> tuple[asyncio.Event, asyncio.Lock]:
        if self._changed is None:  # created on the actor's event loop
            self._changed, self._lock = asyncio.Event(), asyncio.Lock()
        return self._changed, self._lock  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        return {"generation": self.generation, "bank": self.bank, "vectors_sha256": self.sha}

    def _audit(self, entry: dict[str, Any]) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "audit.jsonl", "a") as f:
            f.write(json.dumps({"time": _now_iso(), **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def audit(self, entry: dict[str, Any]) -> None:
        """Record an attempt a replica refused before it reached the coordinator."""
        self._audit(entry)

    async def poll(self, replica: str, applied: int, wait_s: float, sha: str | None = None) -> dict[str, Any]:
        """Renew ``replica``'s lease if it serves the current generation (number and bank hash), then wait
        up to ``wait_s`` for a change. Returns the state and whether a lease was granted (for ``applied``)."""
        changed, _ = self._events()
        granted = applied == self.generation and sha == self.sha
        if granted:
            self.leases[replica] = (applied, time.monotonic() + self.lease_s)
            if wait_s > 0:
                try:
                    await asyncio.wait_for(changed.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
        return {**self.state(), "lease_for": applied if granted else None}

    def leave(self, replica: str) -> None:
        self.leases.pop(replica, None)

    def replicas(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {r: {"generation": g, "lease_left_s": round(exp - now, 3)} for r, (g, exp) in self.leases.items()}

    async def propose(self, bank: str, sha: str, caller: str) -> dict[str, Any]:
        """Publish ``bank`` as the next generation; return once no replica can serve an older one."""
        changed, lock = self._events()
        async with lock:
            g = self.generation + 1
            record = {"caller": caller, "action": "load", "bank": bank, "vectors_sha256": sha, "version": g}
            if self.state_dir is not None:
                try:
                    atomic_write_json(
                        self.state_dir / STATE_FILE, {"generation": g, "bank": bank, "vectors_sha256": sha}
                    )
                except OSError as e:
                    raise RecordError(
                        f"the bank change could not be recorded ({type(e).__name__}); nothing changed"
                    ) from e
                self._audit_quietly({**record, "outcome": "published"})
            t0 = time.monotonic()
            self.generation, self.bank, self.sha = g, bank, sha
            changed.set()  # wake every long poll; later polls see the new generation directly
            self._changed = asyncio.Event()
            while True:
                now = time.monotonic()
                stale = [r for r, (gen, exp) in self.leases.items() if gen < g and exp > now]
                if not stale and now >= self.not_before:
                    break
                await asyncio.sleep(0.005)
            now = time.monotonic()
            confirmed = sorted(r for r, (gen, exp) in self.leases.items() if gen == g and exp > now)
            for r in [r for r, (gen, exp) in self.leases.items() if exp <= now]:
                del self.leases[r]  # lapsed: that replica re-registers through its next poll
            waited = round(time.monotonic() - t0, 4)
            self._audit_quietly({**record, "outcome": "acknowledged", "replicas": len(confirmed), "waited_s": waited})
            return {"generation": g, "replicas_confirmed": confirmed, "waited_s": waited}

    def _audit_quietly(self, entry: dict[str, Any]) -> None:
        """The change is made and recorded in the state file: a failed audit line must not undo or hide it."""
        try:
            self._audit(entry)
        except OSError as e:
            log.error("bank coordinator: could not append to the audit log (%s): %s", type(e).__name__, entry)


# ------------------------------------------------------------------------------------------ replicas


@dataclass(frozen=True)
class ClusterControl(ControlPlane):
    """A replica's control plane: the token and bank root are checked here, the change itself is the
    coordinator's (state and audit live with it)."""

    coordinator: Any = None
    replica: str = ""
    records_locally: ClassVar[bool] = False

    def load_bank(self, runtime: Any, raw: Any, caller: str) -> dict[str, Any]:
        import ray

        from .bank import VectorBank

        try:
            path = self.resolve_bank(raw)
            rel = path.relative_to(self.bank_root).as_posix()  # type: ignore[arg-type]
            bank = VectorBank.load(path)
            snapshot = runtime.reload_bank(bank, dry_run=True)  # every replica runs these same checks
        except ForgetRTError as e:
            refused = {"caller": caller, "action": "load", "bank": str(raw)[:200], "outcome": "refused"}
            try:  # recorded before the client hears of it, as on one server
                ray.get(self.coordinator.audit.remote({**refused, "error": type(e).__name__}), timeout=10)
            except Exception as audit_error:  # noqa: BLE001 - the refusal stands; say it went unrecorded
                log.warning("refused bank change %r could not be audited: %s", str(raw)[:200], audit_error)
            raise
        res = ray.get(self.coordinator.propose.remote(rel, bank.vectors_sha256, f"{caller} via {self.replica}"))
        if not res["replicas_confirmed"]:
            from .service import NotAdmitted

            raise NotAdmitted(
                f"bank {rel!r} is recorded as version {res['generation']} but no replica could apply it (is it on "
                "every node's bank root?): replicas answer 503 until a bank they can load is loaded"
            )
        return {
            "version": res["generation"],
            "vectors": list(snapshot.names),
            "bank": rel,
            "vectors_sha256": bank.vectors_sha256,
            "replicas_confirmed": len(res["replicas_confirmed"]),
        }

    def restore(self, runtime: Any) -> dict[str, Any] | None:
        return None  # a replica applies the coordinator's generation before it is built


class ForgetRTReplica:
    """One Ray Serve replica: a Runtime, the KServe v2 app, and the bank lease (see the module docstring)."""

    def __init__(
        self,
        bundle: str,
        config: dict[str, Any],
        backend_options: dict[str, Any] | None,
        model_name: str,
        limits: dict[str, Any],
        bundle_id: str,
        coordinator_name: str,
        cluster: dict[str, Any],
        token: str | None = None,
        bank_root: str | None = None,
        verify_key: str | None = None,
    ) -> None:
        import ray

        from .batcher import BatchingConfig
        from .runtime import Runtime
        from .server import ServerMetrics

        try:
            from ray import serve

            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - outside a Serve replica (direct construction in tests)
            self.replica = uuid.uuid4().hex[:8]
        self.cluster = ClusterConfig(**cluster)
        self.model_name = model_name
        self.limits = ServerLimits(**limits)
        self.metrics = ServerMetrics()
        cfg = dict(config)
        cfg["batching"] = BatchingConfig(**cfg["batching"])
        self.runtime = Runtime.load(
            bundle, RuntimeConfig(**cfg), backend_options, observer=self.metrics.observe_batch, verify_key=verify_key
        )
        if self.runtime.bundle.bundle_id != bundle_id:
            self.runtime.close()
            raise MismatchError(
                f"replica {self.replica}: bundle {bundle} has id {self.runtime.bundle.bundle_id}, the deployment "
                f"was made from {bundle_id} (every node must see the same bundle)"
            )
        self.coordinator_name = coordinator_name
        self.coordinator = ray.get_actor(coordinator_name, namespace=NAMESPACE)
        self.control = ClusterControl(
            token,
            None if bank_root is None else Path(bank_root),
            None,
            coordinator=self.coordinator,
            replica=self.replica,
        )
        self._bank_root = None if bank_root is None else Path(bank_root).resolve()
        self.applied, self.applied_sha = 0, None
        self.lease_until = 0.0
        self.last_contact = time.monotonic()
        self.last_error: str | None = None
        self._stop = threading.Event()
        try:  # apply the acknowledged bank and take a lease before the first request
            self._sync_once(wait_s=0.0)
        except (ForgetRTError, OSError) as e:
            # it cannot apply the cluster's bank (missing on this node?): it stays up without a lease, answering
            # 503, so a bank every replica can load can still be sent to it; restarting would not help
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("replica %s cannot apply the cluster's bank: %s", self.replica, self.last_error)
        self._thread = threading.Thread(target=self._sync_loop, name="forgetrt-bank-sync", daemon=True)
        self._thread.start()
        log.info("replica %s serving %s (bank version %d)", self.replica, bundle, self.applied)

    # -------------------------------------------------------------------- bank sync
    def _apply(self, state: dict[str, Any]) -> None:
        from .bank import VectorBank

        g = int(state["generation"])
        if g == self.applied and state["vectors_sha256"] == self.applied_sha:
            return
        if state["bank"] is None or self._bank_root is None:
            raise ArtifactError(f"bank generation {g} names no bank this replica can load (is --bank-root set?)")
        try:
            path = self.control.resolve_bank(state["bank"])
        except BankLoadRefused as e:
            raise ArtifactError(f"bank {state['bank']!r} (version {g}) is not under this node's bank root") from e
        bank = VectorBank.load(path)
        if bank.vectors_sha256 != state["vectors_sha256"]:
            raise MismatchError(f"bank {state['bank']!r} on this node differs from the acknowledged one (sha256)")
        self.runtime.reload_bank(bank, version=g)
        self.applied, self.applied_sha = g, bank.vectors_sha256

    def _sync_once(self, wait_s: float) -> None:
        import ray

        sent = time.monotonic()
        try:
            state = ray.get(
                self.coordinator.poll.remote(self.replica, self.applied, wait_s, self.applied_sha),
                timeout=wait_s + self.cluster.lease_s,
            )
        except ray.exceptions.RayActorError:  # the coordinator was replaced (a redeploy): find the new one
            self.coordinator = ray.get_actor(self.coordinator_name, namespace=NAMESPACE)
            object.__setattr__(self.control, "coordinator", self.coordinator)
            raise
        self.last_contact = time.monotonic()
        if state["lease_for"] == self.applied:
            # 10% under the coordinator's count: clocks of two processes (or hosts) may run at slightly
            # different rates, and the replica must always stop first
            self.lease_until = sent + 0.9 * self.cluster.lease_s
        if state["generation"] != self.applied or state["vectors_sha256"] != self.applied_sha:
            self._apply(state)  # the next poll reports it and takes a lease for it
            self._sync_once(0.0)
        self.last_error = None

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_once(self.cluster.poll_s)
            except Exception as e:  # noqa: BLE001 - keep trying; the lease lapses if this persists
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("replica %s: bank sync failed: %s", self.replica, self.last_error)
                self._stop.wait(0.2)

    def admission(self) -> str | None:
        if time.monotonic() < self.lease_until:
            return None
        why = f": {self.last_error}" if self.last_error else ""
        return f"replica {self.replica} holds no current bank lease (out of contact with the coordinator{why}); retry"

    # -------------------------------------------------------------------- Ray Serve hooks
    def __serve_build_asgi_app__(self) -> Any:
        from .server import create_app

        return create_app(
            self.runtime,
            self.model_name,
            metrics=self.metrics,
            limits=self.limits,
            control=self.control,
            admission=self.admission,
            instance=self.replica,
        )

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose check raises: closed, or out of contact with the coordinator
        for three leases (a replica in contact that cannot apply a bank stays, unleased, to take the next)."""
        if self.runtime.closed:
            raise RuntimeError("runtime closed")
        if time.monotonic() - self.last_contact > 3 * self.cluster.lease_s:
            raise RuntimeError(self.admission() or "no contact with the bank coordinator")

    def close(self) -> None:
        self._stop.set()
        try:
            self.coordinator.leave.remote(self.replica)
        except Exception:  # noqa: BLE001 - the coordinator may be gone at shutdown
            pass
        self.runtime.close()


# ------------------------------------------------------------------------------------------ driver


def _coordinator_name(app_name: str) -> str:
    return f"{app_name}-bank-coordinator"


def deploy(
    bundle: str,
    config: RuntimeConfig = RuntimeConfig(),
    backend_options: Any = None,
    *,
    scale: ScaleConfig = ScaleConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    limits: ServerLimits = ServerLimits(),
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = "forgetrt",
    token: str | None = None,
    bank_root: str | None = None,
    state_dir: str | None = None,
    verify_key: str | None = None,
    ray_address: str | None = None,
) -> str:
    """Deploy ``bundle`` on Ray Serve (connecting to ``ray_address``, or starting a local instance) and
    return the base URL once every replica is up. ``token``/``bank_root``/``state_dir``: as for
    ``forgetrt serve`` (all three, or none: banks then cannot change)."""
    import ray
    from ray import serve

    from .bundle import Bundle

    if token is not None and (bank_root is None or state_dir is None):
        raise InvalidInputError("an admin token needs a bank root and a state dir (as for forgetrt serve)")
    if token is None and (bank_root is not None or state_dir is not None):
        raise InvalidInputError("--bank-root and --state-dir take effect with an admin token")
    b = Bundle.load(bundle, verify_key=verify_key)  # refuse a bad bundle here, not in every replica
    name = model_name or Path(bundle).resolve().name
    if state_dir is not None:
        ControlPlane(token, Path(bank_root), Path(state_dir))  # type: ignore[arg-type] # checks root, writable state
    if not ray.is_initialized():
        ray.init(address=ray_address, namespace=NAMESPACE)
    coord_name = _coordinator_name(app_name)
    try:  # a coordinator left by an earlier deployment of this app: start from the persisted state instead
        ray.kill(ray.get_actor(coord_name, namespace=NAMESPACE))
    except ValueError:
        pass
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(BankCoordinator).options(  # on this node: its state dir is the one given here
        name=coord_name,
        namespace=NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
        scheduling_strategy=here,
    )
    coordinator = actor.remote(None if state_dir is None else str(Path(state_dir).resolve()), cluster.lease_s)
    ray.get(coordinator.state.remote())
    serve.start(http_options={"host": host, "port": port})
    cfg = asdict(config)
    deployment = serve.deployment(
        serve.ingress()(ForgetRTReplica),
        name=app_name,
        health_check_period_s=max(1.0, cluster.lease_s / 2),
        **scale.deployment_options(),
    )
    app = deployment.bind(
        str(Path(bundle).resolve()),
        cfg,
        backend_options if backend_options is None or isinstance(backend_options, dict) else asdict(backend_options),
        name,
        asdict(limits),
        b.bundle_id,
        coord_name,
        asdict(cluster),
        token,
        None if bank_root is None else str(Path(bank_root).resolve()),
        verify_key,
    )
    try:
        serve.run(app, name=app_name, route_prefix="/")
    except BaseException:
        ray.kill(coordinator)  # a failed deployment leaves no detached coordinator behind
        raise
    url = f"http://{host}:{port}"
    log.info("deployed %s as model %r on Ray Serve at %s (%s)", bundle, name, url, scale)
    return url


def shutdown(app_name: str = "forgetrt") -> None:
    """Delete the deployment and its coordinator (the persisted state stays in the state dir)."""
    import ray
    from ray import serve

    serve.delete(app_name)
    try:
        ray.kill(ray.get_actor(_coordinator_name(app_name), namespace=NAMESPACE))
    except ValueError:
        pass
