"""One index searched through its shards (faiss' ``IndexShards``, with the verification too).

A sharded index is one store (``store.py``): one manifest, one writer, one model, PCA and trained
IVF-PQ, and each segment held by one shard (``IndexStore.create(shards=N)``: the writer gives a new
segment to the shard with the fewest live photos; compaction merges a shard's segments among
themselves). A shard is served by ``Shard``: the view ``IndexStore.open(path, shard=s)``, which
searches its own rows and verifies against its own local features.

``ShardedIndex`` is what ``search.rank`` searches on the side that takes the queries: the global
top-k of every shard, with exact distances, merged into the whole index's order (nearest first,
ties by store order), and each shortlisted photo verified on the shard that holds it, only its evidence coming
back. Everything else (rows by id, the verified pairs, paths) is the whole index's, read from the
store's files. So a query ranks as on the unsharded index: the same ids, order and inliers.

How a shard is reached is the caller's: anything with ``submit(method, *args)`` → an object with
``result(timeout)``. ``Local`` calls a ``Shard`` in this process; ``serving/ray_shards.py`` calls a
Ray Serve deployment. A shard that does not answer in time raises ``ShardUnavailable`` naming it:
no search is answered from part of the index.
"""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from ..verify import Evidence
from .store import IndexStore

TIMEOUT = 5.0  # seconds a shard has to answer before a search is refused (ShardUnavailable)


class ShardUnavailable(RuntimeError):
    """Some shards did not answer: ``missing`` names them."""

    def __init__(self, missing: list[int], reason: str):
        self.missing = sorted(missing)
        names = ", ".join(map(str, self.missing))
        super().__init__(f"shard{'s' if len(self.missing) > 1 else ''} {names} did not answer ({reason})")


class Shard:
    """One shard's verbs: its global top-k and the verification of its photos, each at the
    generation the caller asks for or a newer one (it moves to the newest when it is behind)."""

    def __init__(self, path, shard: int):
        self.store = IndexStore.open(path, shard=shard)
        self.shard = shard

    def _at(self, generation: int) -> None:
        if self.store.generation < generation:
            self.store.refresh()

    def search(self, Q: np.ndarray, k: int, generation: int = 0):
        """(distances, ids, generation) of this shard's k nearest to each row of ``Q``."""
        self._at(generation)
        D, ids = self.store.search(Q, k)
        return D, ids, self.store.generation

    def verify(self, query, ids, verifier, generation: int = 0):
        """(inliers, tentative, area, stored) of ``query``'s local features against ``ids``'."""
        self._at(generation)
        codes, stored = self.store.local_codes(np.asarray(ids, np.int64))
        ev = verifier.verify(query, codes, stored)
        return ev.inliers, ev.tentative, ev.area, stored

    def info(self) -> dict:
        return {"shard": self.shard, "images": len(self.store), "generation": self.store.generation}


class Local:
    """A ``Shard`` in this process, reached as a remote one is (``submit``)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def submit(self, method: str, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(getattr(self.shard, method)(*args))
        except Exception as e:  # noqa: BLE001 - the caller's result() raises it
            f.set_exception(e)
        return f


class ShardedIndex:
    """``store`` (the whole index, read for rows by id, pairs and paths) searched and verified
    through ``shards`` (one client each, in shard order; see the module docstring)."""

    def __init__(self, store: IndexStore, shards: list, timeout: float = TIMEOUT):
        if len(shards) != store.shards:
            raise ValueError(f"{store.path}: {store.shards} shards, {len(shards)} given")
        # a reshard to fewer shards leaves the others owning nothing; to more, ``search`` says so
        self.store, self.clients, self.timeout = store, list(shards), timeout

    # -- what the shards answer ---------------------------------------------------------------------
    def _call(self, shard: int, method: str, *args):
        """The pending call of ``method`` on ``shard``; one that failed at once where it cannot be made."""
        try:
            return self.clients[shard].submit(method, *args)
        except Exception as e:  # noqa: BLE001 - a handle whose cluster is gone raises here, not at result()
            f: Future = Future()
            f.set_exception(e)
            return f

    def _gather(self, calls: dict) -> dict:
        """{shard: result} of ``calls`` ({shard: pending}); ShardUnavailable naming every shard
        that failed or did not answer within the timeout."""
        got, missing, reason = {}, [], ""
        for sh, pending in calls.items():
            try:
                got[sh] = pending.result(timeout=self.timeout)
            except Exception as e:  # noqa: BLE001 - a dead replica, a timeout, a broken connection
                missing.append(sh)
                reason = reason or (f"{type(e).__name__}: {e}".splitlines()[0][:200])
        if missing:
            raise ShardUnavailable(missing, reason)
        return got

    def search(self, Q: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) as ``IndexStore.search`` gives them for the whole index: each shard's k
        nearest, merged."""
        Q = np.ascontiguousarray(np.atleast_2d(Q), dtype=np.float32)
        if self.store.shards > len(self.clients):  # re-spread over more shards than are served
            raise ShardUnavailable(list(range(len(self.clients), self.store.shards)),
                                   f"the index now has {self.store.shards} shards and {len(self.clients)} are served: "
                                   "restart the service to serve them all")
        g = self.store.generation
        got = self._gather({sh: self._call(sh, "search", Q, k, g) for sh in range(len(self.clients))})
        D = np.concatenate([got[sh][0] for sh in sorted(got)], 1)
        ids = np.concatenate([got[sh][1] for sh in sorted(got)], 1)
        k = min(k, D.shape[1])
        outD, outI = np.full((len(Q), k), np.inf, np.float32), np.full((len(Q), k), -1, np.int64)
        pos = self.store.positions(ids.ravel()).reshape(ids.shape)
        for r in range(len(Q)):
            # nearest first, ties by the whole index's store order, as its own search breaks them
            # (an id the store here does not know yet, committed since, after the others)
            valid = ids[r] >= 0
            key = np.where(valid, D[r], np.inf)
            tie = np.where(valid & (pos[r] >= 0), pos[r], np.iinfo(np.int64).max)
            order = np.lexsort((np.where(valid, ids[r], np.iinfo(np.int64).max), tie, key))[:k]
            outD[r], outI[r] = D[r][order], ids[r][order]
        return outD, outI

    def verify(self, query, ids, verifier) -> tuple[Evidence, np.ndarray]:
        """``search.verify``: each photo of ``ids`` verified on the shard that holds it."""
        ids = np.asarray(ids, np.int64)
        owner = self.store.shards_of(ids)
        ev, stored = Evidence.empty(len(ids)), np.zeros(len(ids), bool)
        g = self.store.generation
        calls = {int(sh): self._call(int(sh), "verify", query, ids[owner == sh], verifier, g)
                 for sh in np.unique(owner[owner >= 0])}
        for sh, (inl, tent, area, have) in self._gather(calls).items():
            at = owner == sh
            ev.inliers[at], ev.tentative[at], ev.area[at], stored[at] = inl, tent, area, have
        return ev, stored

    def health(self, timeout: float = 1.0) -> list[dict]:
        """Each shard's ``Shard.info``, or ``{"shard", "error"}`` where it does not answer within
        ``timeout`` seconds."""
        out = []
        calls = [self._call(sh, "info") for sh in range(len(self.clients))]
        for sh, pending in enumerate(calls):
            try:
                out.append(pending.result(timeout=timeout))
            except Exception as e:  # noqa: BLE001
                out.append({"shard": sh, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        return out

    # -- what the whole index answers (``search.rank``'s other verbs) --------------------------------
    def __len__(self) -> int:
        return len(self.store)

    @property
    def local_k(self) -> int:
        return self.store.local_k

    @property
    def augmented(self) -> bool:
        return self.store.augmented

    @property
    def generation(self) -> int:
        return self.store.generation

    @property
    def model(self):
        return self.store.model

    def vectors(self, ids) -> np.ndarray:
        return self.store.vectors(ids)

    def local_codes(self, ids, coarse: bool = False):
        return self.store.local_codes(ids, coarse)

    def partners(self, ids) -> np.ndarray:
        return self.store.partners(ids)


def local_shards(path) -> list[Local]:
    """Every shard of the index at ``path``, served in this process."""
    n = IndexStore.open(path).shards
    return [Local(Shard(path, s)) for s in range(n)]


__all__ = ["Local", "Shard", "ShardUnavailable", "ShardedIndex", "TIMEOUT", "local_shards"]
