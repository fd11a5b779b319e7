"""Search structures over float32 descriptors: exact L2 (a threaded matrix product) and IVF-PQ
(faiss) whose shortlist is made exact (``refine``). ``IndexStore`` (``store.py``, one floor up)
keeps the IVF-PQ in step with its segments and serves both; this module has no state of its own.
"""
from __future__ import annotations

import faiss
import numpy as np

ANN_THRESHOLD = 100_000  # "auto": exact search below this many images, IVF-PQ from here on
ANN_NPROBE = 16  # inverted lists visited per query, at least (recall/latency: `make bench`)


def default_nprobe(nlist: int) -> int:
    """16 lists, and 1/128 of them beyond 2 048: with √n lists a fixed nprobe loses recall as the
    collection grows (clustered 128-D, recall@10: 0.961 at 1M with 1 024 lists, 0.899 at 10M with
    4 096; 1/128 gives 0.964 there at 3.3 ms, `make bench`)."""
    return max(ANN_NPROBE, nlist // 128)
ANN_RERANK = 10  # candidates re-ranked with exact distances, per result asked for
ANN_MIN_SHORTLIST = 256  # and at least this many: re-ranking them costs microseconds, and it keeps
                         # small collections (whose PQ codes have few bits) exact
CHECKPOINT_SPACING = 10.0  # index checkpoints: at least this many times the last save's duration apart


def refine(Q: np.ndarray, candidates: list[np.ndarray], rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An approximate shortlist made exact: each query's ``candidates`` (positions) ordered by
    their exact squared L2 distance, from their full vectors (``rows(positions)``); the k nearest,
    (distances, positions), padded with inf and -1. So the distances reported are exact, only
    the shortlist is approximate."""
    D = np.full((len(Q), k), np.inf, np.float32)
    P = np.full((len(Q), k), -1, np.int64)
    for i, c in enumerate(candidates):
        c = np.sort(c)  # ties by row order, as the exact search orders them (and a shard's merge, by id)
        d = ((rows(c) - Q[i]) ** 2).sum(1)
        order = np.argsort(d, kind="stable")[:k]
        D[i, :len(order)], P[i, :len(order)] = d[order], c[order]
    return D, P


def encode_codes(trained: faiss.Index, X: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """The IVF-PQ codes of ``X`` (n, sa_code_size) uint8, encoded a chunk at a time."""
    return np.concatenate([trained.sa_encode(np.ascontiguousarray(X[c:c + chunk], np.float32))
                           for c in range(0, len(X), chunk)] or [np.zeros((0, trained.sa_code_size()), np.uint8)])


class ExactIndex:
    """Exact L2 search as one matrix product and a top-k per block of queries (torch, all cores).

    faiss' flat index scans the database on a single thread for a lone query; a search command
    asks one query at a time, where a threaded matrix-vector product is twice as fast.
    """

    def __init__(self, X: np.ndarray):
        import torch  # here, not at import time: the store's readers and writers need no torch

        self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.sq = (self.X * self.X).sum(1)

    def search(self, Q: np.ndarray, k: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
        import torch

        Q = torch.from_numpy(np.ascontiguousarray(Q, dtype=np.float32))
        k = min(k, len(self.X))
        if k <= 0:
            return np.zeros((len(Q), 0), np.float32), np.zeros((len(Q), 0), np.int64)
        D, I = [], []
        with torch.inference_mode():
            for s in range(0, len(Q), block):
                q = Q[s:s + block]
                # ‖x‖² − 2 q·x + ‖q‖², (nq, n): ordered by the distance itself, not by the part
                # that ranks the same, so that rows whose distances round to one value (the photos
                # of a group, augmented to one row) tie, and go by row order, in a shard as in the whole
                dist = torch.addmm(self.sq, q, self.X.T, alpha=-2).add_((q * q).sum(1, keepdim=True))
                kth = torch.topk(dist, k, dim=1, largest=False).values[:, -1:]
                # the k nearest, ties by row order, at the cut too (topk picks among tied rows
                # as it likes): every row up to the k-th distance, in row order, sorted stably
                for r, row in enumerate(dist <= kth):
                    at = torch.nonzero(row).squeeze(1)
                    d, o = dist[r, at].sort(stable=True)
                    D.append(d[:k].clamp_(min=0)[None])
                    I.append(at[o[:k]][None])
        return torch.cat(D).numpy(), torch.cat(I).numpy()


def new_ivfpq(n: int, d: int) -> tuple[faiss.Index, str]:
    """An untrained IVF-PQ sized for ``n`` vectors: about √n lists, 32-byte codes."""
    # about √n lists (a power of two), each trained on ≥ 39 points (faiss' minimum); 256 PQ code
    # words per sub-vector, fewer for a collection too small to train them
    nlist = int(min(2 ** round(np.log2(max(1.0, np.sqrt(n)))), max(1, n // 39)))
    nlist = 2 ** int(np.log2(nlist))
    nbits = int(min(8, max(1, np.log2(max(2, n // 39)))))
    m = next(m for m in (32, 16, 8, 4, 2, 1) if d % m == 0)
    factory = f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}")
    ivf = faiss.index_factory(d, factory)
    # the factory asks for polysemous training (a code ordering for Hamming-distance filtering, which
    # the search here never uses): it took 50 of the 60 s of training, whatever n
    faiss.downcast_index(faiss.extract_index_ivf(ivf)).do_polysemous_training = False
    return ivf, factory


def ivfpq_sample_size(ivf: faiss.Index) -> int:
    """64 points per list for the coarse k-means, ≥ 39 per code word for PQ (faiss' minimum)."""
    return max(64 * faiss.extract_index_ivf(ivf).nlist, 10_000)


__all__ = ["ExactIndex", "encode_codes", "ivfpq_sample_size", "new_ivfpq", "refine"]
