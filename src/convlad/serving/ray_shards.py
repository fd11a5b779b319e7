"""`convlad serve INDEX --ray ADDRESS`: the shards of an index as Ray Serve deployments.

Each shard of the index (``index/shards.py``) is one Ray Serve application, ``convlad-TAG-shard-S``
(TAG: a hash of the index's path),
whose one deployment runs ``Shard`` in ``replicas`` replicas: its global top-k with exact distances
and the verification of its photos against its local features. Ray Serve spreads the replicas over
the cluster's nodes, balances the calls among them and replaces a replica that dies.

The ingress is ``convlad serve`` itself: the same page, API and guards (caps, the bounded queue,
private queries, headers) as the single-process server. It encodes each query once, calls every
shard through its handle and ranks with ``search.rank`` over ``ShardedIndex``. Several ingresses
may serve one set of shards: an ingress that starts finds them deployed (``serve.run`` of the same
application changes nothing), and one that exits leaves them to the others, on a cluster of its own
(``ray start``); Ray's `serve shutdown` removes them. With "local" they end with the ingress. Every node reads the index folder at the same path (a shared file
system), as ``convlad index --ray`` does.

Serve's own HTTP proxy is not started: nothing reaches a shard but its handle.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..index.cluster import RayMissing
from ..index.shards import Shard
from ..index.store import IndexStore

APP = "convlad-{}-shard-{}"  # the index's tag (its path's hash), the shard


def require():
    """Ray and Ray Serve, imported; ``RayMissing`` (one line naming the extra) where they are not installed."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayMissing("--ray needs Ray Serve: pip install 'convlad[ray]' (or pip install 'ray[serve]')") from None
    return ray, serve


class ShardFailed(RuntimeError):
    """A shard's replicas could not start (one line: which shard, and why)."""


class RayShard:
    """A shard's Ray Serve handle, reached as ``index.shards`` reaches any shard (``submit``)."""

    def __init__(self, handle):
        self.handle = handle

    def submit(self, method: str, *args):
        return _Pending(getattr(self.handle, method).remote(*args))


class _Pending:
    def __init__(self, response):
        self.response = response

    def result(self, timeout: float | None = None):
        return self.response.result(timeout_s=timeout)


def connect(address: str, slots: int = 1) -> None:
    """Join the cluster at ``address`` unless joined already; "local" starts one on this machine
    with room for ``slots`` replicas of one CPU, however few cores it has."""
    ray, _ = require()
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, slots + 1), logging_level="warning", log_to_driver=False,
                     include_dashboard=False)
        else:
            ray.init(address=address, logging_level="warning", log_to_driver=False)


def deploy(index, address: str, replicas: int = 1, cpus: float = 1.0) -> list[RayShard]:
    """Deploy (or update) one application per shard of ``index`` on the cluster at ``address``,
    ``replicas`` replicas of ``cpus`` CPUs each (and as many threads), and return a client per
    shard, in shard order."""
    ray, serve = require()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line per application deployed otherwise
    path = str(Path(index).resolve())
    n = IndexStore.open(path).shards
    connect(address, int(n * replicas * max(1.0, cpus)))
    serve.start(proxy_location="Disabled")
    dep = serve.deployment(Shard, name="shard", num_replicas=replicas,
                           ray_actor_options={"num_cpus": cpus, "runtime_env": {"env_vars": _env(cpus)}})
    out = []
    for s in range(n):
        try:
            out.append(RayShard(serve.run(dep.bind(path, s), name=app_name(path, s), route_prefix=None)))
        except Exception as e:  # noqa: BLE001 - a replica that cannot start: its own last line says why
            undeploy(path, s + 1)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ShardFailed(f"shard {s} could not start on the cluster ({lines[-1] if lines else type(e).__name__}); "
                              f"every node must see the index at {path}") from None
    for c in out:  # a handle's first call sets up its router (seconds): before the first query, not in it
        c.submit("info").result(timeout=120)
    return out


def app_name(index, shard: int) -> str:
    """The Ray Serve application of one shard of the index at ``index``: named by the index's path,
    so that ingresses of one index share its shards and those of two indexes do not meet."""
    tag = hashlib.sha1(str(Path(index).resolve()).encode()).hexdigest()[:8]
    return APP.format(tag, shard)


def undeploy(index, n: int) -> None:
    """Delete the first ``n`` shard applications of ``index`` from the cluster."""
    _, serve = require()
    for s in range(n):
        try:
            serve.delete(app_name(index, s), _blocking=False)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass


def _env(cpus: float) -> dict:
    # a replica runs one shard on the CPUs it was given: numpy, torch and OpenCV each start a thread
    # per core of the node otherwise, and several replicas of a node would fight over them
    n = str(max(1, int(cpus)))
    return {k: n for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


__all__ = ["APP", "RayShard", "ShardFailed", "app_name", "connect", "deploy", "require", "undeploy"]
