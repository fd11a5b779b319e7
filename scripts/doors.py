"""mAP of mvbench-dev through each door, with the default descriptor and the search's defaults:
``eval`` (descriptors in memory), the index searched by id (the service's "similar"), and the index
searched by photo (what `convlad search`, `POST /api/search` and ``search.search_images`` do: the
photo encoded again, alone).

    python scripts/doors.py [--shared ../shared/data]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    a = ap.parse_args()
    from convlad.study.datasets import load_groups
    from convlad.study.evaluate import evaluate_model, evaluate_ranking
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD
    from convlad.search import Settings, search_ids, search_images
    from convlad.index.store import IndexStore
    from convlad.index.sync import sync

    shared = Path(a.shared)
    train = shared / "mvbench-train" / "images"
    bench = load_groups(shared / "mvbench-dev")
    t = time.time()
    model = ConvVLAD().fit([str(train / p) for p in list_images(train)], progress=False)
    ev = evaluate_model(model, bench, [], fit=False, progress=False)
    print(f"eval: mAP {ev.result.mAP:.4f} (global {ev.result.extra['mAP_without_rerank']:.4f}), {time.time() - t:.0f}s")
    with tempfile.TemporaryDirectory() as tmp:
        root = shared / "mvbench-dev"
        with IndexStore.create(Path(tmp) / "dev.index", model=model, root=root) as st:
            sync(st, progress=False, report=lambda m: None)
        st = IndexStore.open(Path(tmp) / "dev.index")
        id_of = {p: i for i, p, _ in st.items()}
        ids = np.array([id_of[str(Path(p).relative_to(root))] for p in bench.paths])
        row_of = {int(i): r for r, i in enumerate(ids)}
        full = Settings(k=len(st))

        def ranking(hits):
            return np.array([[bench.query_db[q]] + [row_of[h.id] for h in row if h.id != ids[bench.query_db[q]]]
                             for q, row in enumerate(hits)])

        t = time.time()
        by_id = evaluate_ranking(bench, ranking(search_ids(st, ids[bench.query_db], full))).mAP
        print(f"index, by id: mAP {by_id:.4f}, {time.time() - t:.0f}s")
        t = time.time()
        results, errors = search_images(st, [bench.paths[d] for d in bench.query_db], full)
        assert not errors
        by_photo = evaluate_ranking(bench, ranking([h for _, h in results])).mAP
        print(f"index, by photo (the CLI, the API, search_images): mAP {by_photo:.4f}, {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
