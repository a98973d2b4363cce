"""The semantic cache's vector indexes: prompt vectors -> exact-cache keys, searched by cosine similarity.

One `VectorIndex` per partition (who may share an answer and what it answers: see fastgw.cache.semantic), each an
HNSW graph of usearch (https://github.com/unum-cloud/usearch; chosen over faiss-cpu, an 18.8 MB wheel whose HNSW
index cannot remove entries, and hnswlib, whose last release, 2023, ships no wheels), bounded in entries: the
oldest goes out when a new one comes in past `max_entries` (usearch reuses the removed slots, so its memory stays
bounded too). Small indexes are searched exactly (brute force is cheaper than the graph there, and exact).

Workers: each worker has its own indexes; what any worker adds reaches every worker through `SharedLog`, an
append-only ring of records (partition, key, vector) in a file of the run_dir mapped by all of them. A worker
appends to it only, and every worker (the writer too) adds what it finds there to its indexes when it next
searches (`SemanticIndexes.catch_up`), so all workers hold the same entries. Appends and reads take the file's
flock (exclusive to append, shared to read): they are a few microseconds of copying, and each comes with an
embedding request anyway. A worker that falls more than a whole ring behind skips to the oldest record left.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct

import numpy as np
from usearch.index import Index

EXACT_BELOW = 2048           # entries under which a search is brute force (exact, and as fast as the graph)
_MAGIC = 0x31474F4C4D455346  # "FSEMLOG1"
_HEAD = struct.Struct("<QQQQ")           # magic, capacity (ring bytes), head, tail (absolute positions)
_HEAD_SIZE = 64
_REC = struct.Struct("<IHH16sI")         # record length (8-aligned), kind, partition length, key, dim
_PAD, _ENTRY = 1, 2                      # kinds: the unused rest of a lap, an entry


class VectorIndex:
    """One partition's vectors and the exact-cache key of each, oldest out past max_entries."""

    def __init__(self, ndim: int, max_entries: int):
        self.ndim = ndim
        self.max_entries = max_entries
        self.index = Index(ndim=ndim, metric="cos", dtype="f32")
        self.keys: dict[int, bytes] = {}     # label -> cache key, in insertion order (oldest first)
        self.labels: dict[bytes, int] = {}   # cache key -> label
        self.next_label = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, vector: np.ndarray, key: bytes) -> None:
        old = self.labels.pop(key, None)
        if old is not None:                  # the same answer again (a refresh): its new vector replaces it
            self._drop(old)
        label = self.next_label
        self.next_label += 1
        self.index.add(label, vector)
        self.keys[label] = key
        self.labels[key] = label
        while len(self.keys) > self.max_entries:
            oldest = next(iter(self.keys))
            del self.labels[self.keys[oldest]]
            self._drop(oldest)

    def search(self, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        """(key, similarity) of the nearest vector when its cosine similarity is >= threshold, else None."""
        if not self.keys:
            return None
        m = self.index.search(vector, 1, exact=len(self.keys) < EXACT_BELOW)
        if len(m.keys) == 0:
            return None
        similarity = 1.0 - float(m.distances[0])
        if not similarity >= threshold:      # NaN (a degenerate vector) is a miss too
            return None
        return self.keys[int(m.keys[0])], similarity

    def forget(self, key: bytes) -> None:
        """The exact cache no longer holds `key` (expired, overwritten): drop its vector."""
        label = self.labels.pop(key, None)
        if label is not None:
            self._drop(label)

    def _drop(self, label: int) -> None:
        del self.keys[label]
        self.index.remove(label)


class SemanticIndexes:
    """This worker's indexes by partition (at most max_indexes, the least recently used dropped), fed by the
    shared log."""

    def __init__(self, log: SharedLog, max_entries: int, max_indexes: int):
        self.log = log
        self.max_entries = max_entries
        self.max_indexes = max_indexes
        self.indexes: dict[bytes, VectorIndex] = {}   # least recently used first
        self.pos = log.oldest()              # the next record of the log to read

    def add(self, partition: bytes, vector: np.ndarray, key: bytes) -> None:
        """Share a new entry with every worker (this one included: it reads it back with the others')."""
        self.log.append(partition, key, vector)

    def search(self, partition: bytes, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        self.catch_up()
        ix = self.indexes.get(partition)
        if ix is None or ix.ndim != len(vector):
            return None
        self.indexes[partition] = self.indexes.pop(partition)     # most recently used
        return ix.search(vector, threshold)

    def forget(self, partition: bytes, key: bytes) -> None:
        ix = self.indexes.get(partition)
        if ix is not None:
            ix.forget(key)

    def catch_up(self) -> int:
        """Add the log's records this worker has not read yet; how many."""
        records, self.pos = self.log.read(self.pos)
        for partition, key, vector in records:
            ix = self.indexes.get(partition)
            if ix is None or ix.ndim != len(vector):      # new, or its embeddings model changed dimensions
                ix = self.indexes[partition] = VectorIndex(len(vector), self.max_entries)
                while len(self.indexes) > self.max_indexes:
                    del self.indexes[next(iter(self.indexes))]
            ix.add(vector, key)
        return len(records)

    def close(self) -> None:
        self.log.close()


class SharedLog:
    """An append-only ring of (partition, key, vector) records in a file mapped by every worker.

    Header: magic, capacity, head (where the next record goes), tail (the oldest record still whole), both absolute
    positions that only grow (offset = 64 + position % capacity). A record never wraps: the rest of a lap too short
    for it becomes a pad record. An append that needs room moves tail past the oldest records first. Every field
    is read and written under the file's flock, so readers never see a half-written record or header.
    """

    def __init__(self, path: str, capacity: int):
        capacity -= capacity % 8
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # opened by each worker: its own flock
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self.fd).st_size != _HEAD_SIZE + capacity:
                    os.ftruncate(self.fd, _HEAD_SIZE + capacity)
                    os.pwrite(self.fd, _HEAD.pack(_MAGIC, capacity, 0, 0), 0)
                self.mm = mmap.mmap(self.fd, _HEAD_SIZE + capacity)
                magic, cap, _, _ = _HEAD.unpack_from(self.mm, 0)
                if magic != _MAGIC or cap != capacity:
                    raise ValueError(f"{path}: not a semantic cache log of {capacity} bytes")
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity = capacity

    def append(self, partition: bytes, key: bytes, vector: np.ndarray) -> bool:
        """False when the record is too large for the ring (over a quarter of it) or malformed."""
        vec = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        size = _REC.size + len(partition) + len(vec)
        size += -size % 8
        if len(key) != 16 or len(partition) > 0xFFFF or size > self.capacity // 4:
            return False
        mm, cap = self.mm, self.capacity
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            _, _, head, tail = _HEAD.unpack_from(mm, 0)
            rest = cap - head % cap
            if rest < size:                   # the lap's end: pad it, start the record at the next lap
                tail = self._make_room(head, tail, rest)
                _REC.pack_into(mm, _HEAD_SIZE + head % cap, rest, _PAD, 0, b"\0" * 16, 0)
                head += rest
            tail = self._make_room(head, tail, size)
            o = _HEAD_SIZE + head % cap
            _REC.pack_into(mm, o, size, _ENTRY, len(partition), key, len(vector))
            o += _REC.size
            mm[o:o + len(partition)] = partition
            o += len(partition)
            mm[o:o + len(vec)] = vec
            _HEAD.pack_into(mm, 0, _MAGIC, cap, head + size, tail)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def _make_room(self, head: int, tail: int, size: int) -> int:
        """The new tail once the records the next `size` bytes overwrite are given up."""
        while head + size - tail > self.capacity:
            tail += _REC.unpack_from(self.mm, _HEAD_SIZE + tail % self.capacity)[0]
        return tail

    def oldest(self) -> int:
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            return _HEAD.unpack_from(self.mm, 0)[3]
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read(self, pos: int) -> tuple[list, int]:
        """The records from absolute position `pos` on (from the oldest left, if those at `pos` are gone), and
        the position after them."""
        mm, cap = self.mm, self.capacity
        out = []
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            _, _, head, tail = _HEAD.unpack_from(mm, 0)
            if pos < tail:
                pos = tail
            while pos < head:
                o = _HEAD_SIZE + pos % cap
                size, kind, plen, key, dim = _REC.unpack_from(mm, o)
                if kind == _ENTRY:
                    o += _REC.size
                    partition = mm[o:o + plen]
                    o += plen
                    vector = np.frombuffer(mm[o:o + 4 * dim], dtype="<f4")
                    out.append((partition, key, vector))
                pos += size
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return out, pos

    def close(self) -> None:
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
