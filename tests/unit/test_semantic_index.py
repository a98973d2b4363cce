"""The semantic cache's vector index (fastgw/cache/semantic_index.py) against brute-force cosine search on random
vectors: what it finds at the threshold, its bound, and the shared log that carries entries between workers."""
import multiprocessing as mp

import numpy as np
import pytest

from fastgw.cache.semantic_index import EXACT_BELOW, SemanticIndexes, SharedLog, VectorIndex

DIM = 64


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def near(rng, base, similarity):
    """A vector whose cosine similarity to the unit vector `base` is `similarity`."""
    noise = rng.standard_normal(base.shape)
    noise -= noise.dot(base) * base
    noise = unit(noise)
    return (similarity * base + np.sqrt(1 - similarity ** 2) * noise).astype(np.float32)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def brute(stored: np.ndarray, q: np.ndarray):
    sims = unit(stored) @ unit(q)
    i = int(np.argmax(sims))
    return i, float(sims[i])


@pytest.mark.parametrize("n", [500, EXACT_BELOW * 3])     # the exact search, then the HNSW graph
def test_recall_at_threshold_against_brute_force(n):
    rng = np.random.default_rng(n)
    stored = unit(rng.standard_normal((n, DIM))).astype(np.float32)
    ix = VectorIndex(DIM, max_entries=n)
    for i, v in enumerate(stored):
        ix.add(v, key(i))
    threshold = 0.9
    queries = [near(rng, stored[rng.integers(n)], s) for s in rng.uniform(0.8, 1.0, 400)]
    queries += list(unit(rng.standard_normal((200, DIM))).astype(np.float32))   # unrelated: nothing near
    should, found = 0, 0
    for q in queries:
        best, best_sim = brute(stored, q)
        got = ix.search(q, threshold)
        if got is not None:
            # Never a match below the threshold, and its similarity is the true one of the key it names.
            k, sim = got
            i = int.from_bytes(k, "little")
            assert sim >= threshold
            assert sim == pytest.approx(float(unit(stored[i]) @ unit(q)), abs=1e-4)
        if best_sim >= threshold:
            should += 1
            if got is not None and got[0] == key(best):
                found += 1
        else:
            assert got is None
    assert should > 150
    assert found / should >= (1.0 if n < EXACT_BELOW else 0.98)


def test_bounded_oldest_out_and_replaced_keys():
    rng = np.random.default_rng(7)
    vecs = unit(rng.standard_normal((50, DIM))).astype(np.float32)
    ix = VectorIndex(DIM, max_entries=10)
    for i in range(50):
        ix.add(vecs[i], key(i))
        assert len(ix) == min(i + 1, 10)
    assert ix.search(vecs[39], 0.99) is None                  # out
    assert ix.search(vecs[40], 0.99)[0] == key(40)            # the last ten remain
    ix.add(vecs[0], key(45))                                  # the same key again: its new vector replaces it
    assert len(ix) == 10
    assert ix.search(vecs[45], 0.99) is None
    assert ix.search(vecs[0], 0.99)[0] == key(45)
    ix.forget(key(45))
    assert ix.search(vecs[0], 0.99) is None and len(ix) == 9


def test_degenerate_vectors_miss():
    ix = VectorIndex(4, 10)
    ix.add(np.array([1, 0, 0, 0], np.float32), key(1))
    assert ix.search(np.zeros(4, np.float32), 0.5) is None
    assert VectorIndex(4, 10).search(np.ones(4, np.float32), 0.0) is None   # empty


def test_log_round_trip_and_wrap(tmp_path):
    log = SharedLog(str(tmp_path / "log"), 16 * 1024)
    rng = np.random.default_rng(3)
    written = []
    pos = log.oldest()
    got = []
    for i in range(200):                     # ~280 bytes a record: the ring wraps several times
        v = rng.standard_normal(DIM).astype(np.float32)
        p = f"part-{i % 3}".encode()
        assert log.append(p, key(i), v)
        written.append((p, key(i), v))
        if i % 7 == 0:
            records, pos = log.read(pos)
            got += records
    records, pos = log.read(pos)
    got += records
    assert [(p, k) for p, k, _ in got] == [(p, k) for p, k, _ in written]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(got, written))
    # A reader that fell behind a whole ring gets the records still whole, the newest last.
    late, _ = log.read(0)
    assert 0 < len(late) < 200 and late[-1][1] == key(199)
    assert [r[1] for r in late] == [k for _, k, _ in written[-len(late):]]
    assert not log.append(b"p", key(1), np.zeros(2048, np.float32))      # over a quarter of the ring
    log.close()


def _writer(path, worker, n):
    log = SharedLog(path, 1 << 20)
    rng = np.random.default_rng(worker)
    for i in range(n):
        log.append(f"w{worker}".encode(), key(worker * 10000 + i), rng.standard_normal(DIM).astype(np.float32))
    log.close()


def test_entries_of_every_worker_reach_every_index(tmp_path):
    path = str(tmp_path / "log")
    mine = SemanticIndexes(SharedLog(path, 1 << 20), max_entries=1000, max_indexes=10)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 300)) for w in range(1, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    mine.add(b"w0", np.ones(DIM, np.float32), key(5))
    assert mine.catch_up() == 901
    for w in range(1, 4):
        rng = np.random.default_rng(w)
        vecs = [rng.standard_normal(DIM).astype(np.float32) for _ in range(300)]
        for i in (0, 150, 299):
            k, sim = mine.search(f"w{w}".encode(), vecs[i], 0.999)
            assert k == key(w * 10000 + i) and sim > 0.999
    assert mine.search(b"w0", np.ones(DIM, np.float32), 0.999)[0] == key(5)
    assert mine.search(b"w1", np.ones(DIM + 1, np.float32), 0.5) is None    # another dimension: no answer
    mine.close()


def test_indexes_bounded_least_recently_used_out(tmp_path):
    ixs = SemanticIndexes(SharedLog(str(tmp_path / "log"), 1 << 20), max_entries=5, max_indexes=3)
    v = np.ones(8, np.float32)
    for p in (b"a", b"b", b"c"):
        ixs.add(p, v, key(1))
    assert ixs.search(b"a", v, 0.9) is not None               # a is used: b is now the least recent
    ixs.add(b"d", v, key(2))
    ixs.catch_up()
    assert set(ixs.indexes) == {b"a", b"c", b"d"}
    ixs.close()
