"""BucketArena against a plain-Python twin, and exactness across processes sharing one arena file."""
import multiprocessing as mp
import os

import pytest
from hypothesis import given, settings, strategies as st

from fastgw.policies.ratelimit.bucket import BucketArena, BucketTableFull, monotonic_ns


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


# ---------------------------------------------------------------------------------------------- plans

from fastgw.policies.ratelimit.bucket import BucketPlan, format_reset  # noqa: E402


def twin_format_duration(s: float) -> str:
    """OpenAI's reset format, written the plain way (as fastgw.policies.ratelimit.policy.format_duration)."""
    ms = int(s * 1000 + 0.5)
    if ms <= 0:
        return "0s" if s <= 0 else "1ms"
    if ms < 1000:
        return f"{ms}ms"
    m, ms = divmod(ms, 60000)
    secs = f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0") + "s"
    if m == 0:
        return secs
    h, m = divmod(m, 60)
    return f"{h}h{m}m{secs}" if h else f"{m}m{secs}"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(-10, 1e9, allow_nan=False), st.integers(0, 10**10).map(lambda ms: ms / 1000),
                 st.sampled_from([0, 0.0004, 0.0005, 0.9995, 59.9995, 59.9996, 3599.9995, 86400, 7.66])))
def test_format_reset_like_python(s):
    assert format_reset(s) == twin_format_duration(s)


def heads_for(what, cap):
    return (b"x-ratelimit-limit-%s: %d\r\nx-ratelimit-remaining-%s: " % (what, cap, what),
            b"\r\nx-ratelimit-reset-%s: " % what)


def twin_headers(plan_spec, rem):
    """The x-ratelimit-* lines the policy used to build in Python: the tightest bucket of each kind."""
    out = b""
    for kind in (False, True):
        idx = [i for i, (_, _, _, tok) in enumerate(plan_spec) if tok == kind]
        if not idx:
            continue
        i = min(idx, key=lambda j: (rem[j], j))
        _, cap, rate, tok = plan_spec[i]
        head, mid = heads_for(b"tokens" if tok else b"requests", int(cap))
        left = rem[i]
        reset = twin_format_duration((cap - left) / rate) if rate > 0 else "0s"
        out += b"%s%d%s%s\r\n" % (head, left if left > 0 else 0, mid, reset.encode())
    return out


PLAN_BUCKETS = [(11, 3.0, 1.0, False), (12, 50.0, 5.0, True), (13, 2.0, 0.1, False), (14, 400.0, 40.0, True),
                (15, 1.0, 0.0, False)]
plans = st.lists(st.sampled_from(PLAN_BUCKETS), min_size=1, max_size=4, unique=True)
plan_ops = st.lists(st.tuples(st.sampled_from(["reserve", "settle"]), st.floats(0, 120).map(lambda x: round(x, 2)),
                              st.floats(0, 120).map(lambda x: round(x, 2)), st.integers(0, 2_000_000_000)),
                    max_size=40)


@settings(max_examples=200, deadline=None)
@given(plans, plan_ops)
def test_plan_matches_take_all_on_twin(tmp_path_factory, spec, seq):
    # reserve = take from each bucket in order, giving back to the earlier ones on the first refusal;
    # settle = give (reserved - actual) back to every tokens bucket; headers from the remaining figures.
    a = BucketArena(str(tmp_path_factory.mktemp("p") / "buckets"), 64)
    plan = BucketPlan([k for k, _, _, _ in spec], [c for _, c, _, _ in spec], [r for _, _, r, _ in spec],
                      [t for _, _, _, t in spec], [heads_for(b"tokens" if t else b"requests", int(c))
                                                   for _, c, _, t in spec])
    assert len(plan) == len(spec) and plan.has_tokens == any(t for _, _, _, t in spec)
    twin = TwinBucket()
    now = 10**12
    for op, x, y, step in seq:
        now += step
        if op == "reserve":
            fail, rem = -1, []
            for i, (key, cap, rate, tok) in enumerate(spec):
                ok, r = twin.take(key, cap, rate, x if tok else 1.0, now)
                rem.append(r)
                if not ok:
                    for key2, cap2, rate2, tok2 in spec[:i]:
                        twin.give_back(key2, cap2, rate2, x if tok2 else 1.0, now)
                    fail = i
                    break
            assert plan.reserve(a, x, True, now) == fail
            assert [plan.remaining(i) for i in range(len(rem))] == rem
            assert plan.headers == (twin_headers(spec, rem) if fail < 0 else b"")
        else:
            plan.settle(a, x, y, now)
            for key, cap, rate, tok in spec:
                if tok and x != y:
                    twin.give_back(key, cap, rate, x - y, now)
        for key, cap, rate, _ in spec:
            assert a.peek(key, cap, rate, now) == twin.peek(key, cap, rate, now)
    assert plan.header_lines([5.0] * len(spec)) == twin_headers(spec, [5.0] * len(spec))
    a.close()


def test_plan_rolls_back_when_the_table_is_full(tmp_path):
    a = BucketArena(str(tmp_path / "b"), 8)
    for k in range(1, 8):
        a.take(k, 10, 1, 1, 10**12)
    plan = BucketPlan([1, 100, 101], [10.0] * 3, [1.0] * 3, [False, False, False], [heads_for(b"requests", 10)] * 3)
    with pytest.raises(BucketTableFull):      # 100 takes the last slot, 101 finds none: 1 and 100 get theirs back
        plan.reserve(a, 0, False, 10**12)
    assert a.peek(1, 10, 1, 10**12) == pytest.approx(9, abs=1e-6) and a.peek(100, 10, 1, 10**12) == 10
    with pytest.raises(ValueError):
        BucketPlan([1], [1.0], [1.0], [True, False], [heads_for(b"tokens", 1)])
