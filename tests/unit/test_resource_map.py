"""fastgw.routing.resources: the resource id -> (owner, deployment) table the workers share, against a plain dict
(what it must remember while it has room), across processes, and when full (the oldest ids go first)."""
import multiprocessing
import random

from fastgw.routing.resources import ResourceMap, is_resource_id, owner_key


def test_it_remembers_what_a_dict_would_while_it_has_room(tmp_path):
    m = ResourceMap(str(tmp_path / "r.shm"), 4096)
    rng = random.Random(1)
    want = {}
    for i in range(1500):                          # well under capacity: nothing is evicted
        rid = f"file-{rng.getrandbits(64):x}"
        want[rid] = (owner_key(f"c{i % 7}"), rng.getrandbits(63))
        m.record(rid, *want[rid])
        if i % 5 == 0:                             # re-recording an id replaces its entry
            want[rid] = (owner_key("c-new"), 42)
            m.record(rid, *want[rid])
        if i % 11 == 0:
            gone = rng.choice(list(want))
            m.forget(gone)
            del want[gone]
    for rid, value in want.items():
        assert m.lookup(rid) == value
    assert m.lookup("file-never-recorded") is None
    again = ResourceMap(str(tmp_path / "r.shm"), 4096)   # another mapping of the same file sees it all
    assert all(again.lookup(rid) == v for rid, v in want.items())


def _writer(path, k, n):
    m = ResourceMap(path, 1 << 14)
    for i in range(n):
        m.record(f"batch_{k}_{i}", owner_key(f"w{k}"), k)


def test_workers_write_side_by_side(tmp_path):
    path = str(tmp_path / "r.shm")
    ResourceMap(path, 1 << 14)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, k, 1500)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = ResourceMap(path, 1 << 14)
    for k in range(4):
        for i in range(1500):
            assert m.lookup(f"batch_{k}_{i}") == (owner_key(f"w{k}"), k)


def test_full_it_keeps_the_most_recent(tmp_path):
    m = ResourceMap(str(tmp_path / "r.shm"), 64)
    ids = [f"vs_{i}" for i in range(2000)]
    for i, rid in enumerate(ids):
        m.record(rid, 1, i)
    recent = ids[-8:]                               # the last few always fit within their probe windows
    assert all(m.lookup(rid) is not None for rid in recent)
    assert sum(m.lookup(rid) is not None for rid in ids) <= 64


def test_which_strings_are_resource_ids():
    assert is_resource_id("file-abc") and is_resource_id("batch_123") and is_resource_id("vs_abc1")
    assert not any(is_resource_id(x) for x in ("file_batches", "content", "files", "", None, 5, "x" * 300))
