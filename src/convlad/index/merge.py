"""The merge policy of an index store (Lucene's MergePolicy): which segments to merge, as pure
functions of their sizes. ``IndexStore.compact`` does the merging."""
from __future__ import annotations

from collections.abc import Sequence

COMPACT_TARGET = 1_000_000  # rows per segment that compaction builds up to; larger clean segments stay
# A reader maps about 6 files per segment, each holding a file descriptor: beyond this many small
# segments (one per upload, one per 500 images indexed) a commit compacts them, as Lucene's merge
# policy does, so millions of photos stay a few hundred segments.
MAX_SMALL_SEGMENTS = 64


def plan_merges(rows: Sequence[int], live: Sequence[int], target_rows: int = COMPACT_TARGET) -> list[list[int]]:
    """Groups of segment positions to merge into one each, given each segment's ``rows`` and its
    ``live`` (not deleted) rows. Runs of neighbouring small segments (under half the target) are
    merged up to ``target_rows`` live rows; a segment with dead rows is rewritten even alone; a
    large clean segment stays and ends a run. Store order is kept: ids stay increasing."""
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_rows = 0

    def dirty(i: int) -> bool:
        return live[i] < rows[i]

    def close() -> None:
        if len(cur) > 1 or (cur and dirty(cur[0])):
            groups.append(list(cur))

    for i, n in enumerate(rows):
        if not (n < target_rows // 2 or dirty(i)):
            close()
            cur, cur_rows = [], 0
            continue
        if cur and cur_rows + live[i] > target_rows:
            close()
            cur, cur_rows = [], 0
        cur.append(i)
        cur_rows += live[i]
    close()
    return groups


def needs_compaction(rows: Sequence[int], target_rows: int = COMPACT_TARGET) -> bool:
    """After a commit: too many small segments for a reader's file descriptors."""
    return sum(n < target_rows // 2 for n in rows) > MAX_SMALL_SEGMENTS


__all__ = ["COMPACT_TARGET", "MAX_SMALL_SEGMENTS", "needs_compaction", "plan_merges"]
