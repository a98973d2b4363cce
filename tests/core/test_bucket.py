"""BucketArena against a plain-Python twin, and exactness across processes sharing one arena file."""
import multiprocessing as mp
import os

import pytest
from hypothesis import given, settings, strategies as st

from fastgw._core.bucket import BucketArena, BucketTableFull, monotonic_ns


class TwinBucket:
    """The reference: the same arithmetic, in the same order, on Python floats."""

    def __init__(self):
        self.state = {}  # key -> [tokens, stamp]

    def _get(self, key, init_tokens, init_stamp):
        if key not in self.state:
            self.state[key] = [init_tokens, init_stamp]
        return self.state[key]

    @staticmethod
    def _refill(s, cap, rate, now):
        elapsed = now - s[1]
        if elapsed > 0:
            if s[0] < cap:
                s[0] = s[0] + (elapsed * 1e-9) * rate
                if s[0] > cap:
                    s[0] = cap
            s[1] = now

    def take(self, key, cap, rate, amount, now):
        s = self._get(key, cap, now)
        self._refill(s, cap, rate, now)
        ok = s[0] >= amount
        if ok:
            s[0] -= amount
        return ok, s[0]

    def give_back(self, key, cap, rate, amount, now):
        s = self._get(key, cap, now)
        self._refill(s, cap, rate, now)
        s[0] = min(cap, s[0] + amount)
        return s[0]

    def peek(self, key, cap, rate, now):
        s = self._get(key, cap, now)
        self._refill(s, cap, rate, now)
        return s[0]

    def charge(self, key, period, limit, amount, check):
        s = self._get(("c", key), 0.0, period)
        if period < s[1]:
            if not check:
                return True, 0.0
            period = s[1]
        elif period > s[1]:
            s[:] = [0.0, period]
        ok = (not check) or s[0] + amount <= limit
        if ok:
            s[0] += amount
        return ok, s[0]


@pytest.fixture
def arena(tmp_path):
    a = BucketArena(str(tmp_path / "buckets"), 64)
    yield a
    a.close()


# Buckets keep their own (capacity, rate) so that the twin and the arena see consistent parameters.
BUCKETS = {1: (10.0, 2.0), 2: (1.0, 0.5), 3: (1000.0, 1e6), 4: (5.0, 0.0)}
ops = st.lists(
    st.tuples(
        st.sampled_from(["take", "give_back", "peek", "charge"]),
        st.sampled_from(sorted(BUCKETS)),
        st.floats(-20, 20, allow_nan=False).map(lambda x: round(x, 3)),
        st.integers(0, 3_000_000_000),  # time step in ns
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_python_twin(tmp_path_factory, seq):
    a = BucketArena(str(tmp_path_factory.mktemp("a") / "buckets"), 64)
    twin = TwinBucket()
    now = 10**12
    for op, key, x, step, flag in seq:
        now += step
        cap, rate = BUCKETS[key]
        if op == "take":
            amount = abs(x)
            assert a.take(key, cap, rate, amount, now) == twin.take(key, cap, rate, amount, now)
        elif op == "give_back":
            assert a.give_back(key, cap, rate, x, now) == twin.give_back(key, cap, rate, x, now)
        elif op == "peek":
            assert a.peek(key, cap, rate, now) == twin.peek(key, cap, rate, now)
        else:
            period = now // 2_000_000_000 - (1 if flag and step % 3 == 0 else 0)  # sometimes a stale period
            assert a.charge(key + 100, period, 12.5, abs(x), flag) == twin.charge(key + 100, period, 12.5, abs(x), flag)
    a.close()


def test_refill_and_refusal_takes_nothing(arena):
    t = 5 * 10**9
    assert arena.take(7, 3, 1, 2, t) == (True, 1.0)
    assert arena.take(7, 3, 1, 2, t) == (False, 1.0)          # refused: nothing taken
    assert arena.take(7, 3, 1, 2, t + 10**9) == (True, 0.0)   # one second refilled one token
    assert arena.peek(7, 3, 1, t + 100 * 10**9) == 3.0         # capped at capacity
    assert arena.give_back(7, 3, 1, -5, t + 100 * 10**9) == -2.0  # a settle may go into debt
    assert arena.take(7, 3, 1, 1, t + 101 * 10**9) == (False, -1.0)


def test_default_clock_is_monotonic(arena):
    before = monotonic_ns()
    ok, rem = arena.take(1, 10, 0, 1)
    assert ok and rem == 9.0
    assert monotonic_ns() >= before


def test_reopen_shares_state_and_checks_size(tmp_path):
    path = str(tmp_path / "b")
    a = BucketArena(path, 64)
    a.take(42, 10, 0, 4, 0)
    b = BucketArena(path, 64)
    assert b.peek(42, 10, 0, 0) == 6.0
    with pytest.raises(ValueError):
        BucketArena(path, 128)
    a.close()
    b.close()


def test_table_full(tmp_path):
    a = BucketArena(str(tmp_path / "b"), 8)
    for k in range(1, 9):
        a.take(k * 977, 1, 0, 1, 0)
    assert a.in_use() == 8
    assert a.take(977, 1, 0, 1, 0) == (False, 0.0)  # existing keys still work
    with pytest.raises(BucketTableFull):
        a.take(12345, 1, 0, 1, 0)
    a.close()


def test_colliding_keys_are_distinct(arena):
    # Same home slot (same low bits), different keys: linear probing keeps them apart.
    k1, k2 = 5, 5 + 64 * 1000
    arena.take(k1, 10, 0, 3, 0)
    arena.take(k2, 10, 0, 1, 0)
    assert arena.peek(k1, 10, 0, 0) == 7.0 and arena.peek(k2, 10, 0, 0) == 9.0
    assert arena.take(0, 2, 0, 1, 0) == (True, 1.0)  # key 0 is usable too


def _hammer(path, key, capacity, tries, q):
    a = BucketArena(path, 1024)
    admitted = 0
    for _ in range(tries):
        ok, _ = a.take(key, capacity, 0.0, 1.0)
        admitted += ok
        # The counter on another key checks the charge path under contention too.
        a.charge(key + 1, 1, 1e18, 1.0, False)
    q.put(admitted)


def test_four_processes_admit_exactly_capacity(tmp_path):
    path = str(tmp_path / "shared")
    BucketArena(path, 1024).close()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    L, tries = 5000, 4000  # 16,000 attempts against 5,000 tokens, all four racing
    procs = [ctx.Process(target=_hammer, args=(path, 99, float(L), tries, q)) for _ in range(4)]
    for p in procs:
        p.start()
    counts = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sum(counts) == L
    a = BucketArena(path, 1024)
    assert a.used(100, 1) == 4 * tries      # no lost update on the counter either
    a.close()
