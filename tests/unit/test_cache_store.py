"""The response cache's shared-memory ring (fastgw/cache/store.pyx) against its plain-Python model, RingReference,
on random operation sequences; and across writer processes, where a read may miss but never returns another key's
bytes or a torn value."""
import multiprocessing as mp
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.cache.store import RingReference, SharedStore, layout

SIZE = 64 * 1024


def key_of(i: int) -> bytes:
    # Few distinct low halves: keys share index sets, so eviction by set is exercised too.
    return (i % 7).to_bytes(8, "little") + (i * 2654435761 + 1).to_bytes(8, "little")


ops = st.lists(st.tuples(st.sampled_from(["put", "get", "get", "tick"]), st.integers(0, 40),
                         st.integers(0, 6000), st.sampled_from([0.5, 5.0, 100.0])), max_size=300)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_store_matches_reference(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("ring") / "store.shm")
    store, ref = SharedStore(path, SIZE), RingReference(SIZE)
    now = 1000.0
    for op, k, n, ttl in ops:
        key = key_of(k)
        if op == "put":
            value = bytes([k % 251]) * n
            assert store.put(key, value, ttl, now) == ref.put(key, value, ttl, now)
            assert store.head == ref.head
        elif op == "get":
            assert store.get(key, now) == ref.get(key, now)
        else:
            now += ttl
    for k in range(41):
        assert store.get(key_of(k), now) == ref.get(key_of(k), now)
    store.close()


def test_bounded_by_its_size_under_a_churn_of_unique_keys(tmp_path):
    store = SharedStore(str(tmp_path / "s.shm"), 1 << 20)
    assert os.path.getsize(tmp_path / "s.shm") == store.file_bytes == 1 << 20
    capacity, _ = layout(1 << 20)
    value = os.urandom(3000)
    for i in range(5000):                                     # ~15 MB written through a 1 MB store
        assert store.put(os.urandom(16), value, 60.0)
    assert os.path.getsize(tmp_path / "s.shm") == 1 << 20    # the file never grows
    k = os.urandom(16)
    store.put(k, b"newest", 60.0)
    assert store.get(k) == b"newest"
    assert not store.put(os.urandom(16), b"x" * (capacity // 4), 60.0)   # too large: refused, not stored


def test_too_short_or_long_keys_are_misses(tmp_path):
    store = SharedStore(str(tmp_path / "s.shm"), SIZE)
    assert store.get(b"short") is None and not store.put(b"short", b"v", 1.0)


def _writer(path, seed, rounds, q):
    store = SharedStore(path, SIZE)
    rng = random.Random(seed)
    bad = 0
    hits = 0
    for _ in range(rounds):
        k = rng.randrange(64)
        key = key_of(k)
        if rng.random() < 0.5:
            store.put(key, _value(k, rng.randrange(1, 4000)), 60.0)
        else:
            v = store.get(key)
            if v is not None:
                hits += 1
                if v != _value(k, len(v)):
                    bad += 1
    q.put((bad, hits))


def _value(k: int, n: int) -> bytes:
    pattern = (k.to_bytes(2, "little") + b"abcdefgh") * (n // 10 + 1)
    return pattern[:n]


def test_many_processes_never_read_another_keys_bytes(tmp_path):
    path = str(tmp_path / "s.shm")
    SharedStore(path, SIZE)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, seed, 20000, q)) for seed in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(b for b, _ in results) == 0
    assert sum(h for _, h in results) > 0                     # reads did find entries the others wrote


def test_a_store_of_another_size_is_refused(tmp_path):
    SharedStore(str(tmp_path / "s.shm"), SIZE)
    with pytest.raises(ValueError):
        SharedStore(str(tmp_path / "s.shm"), SIZE * 2)
