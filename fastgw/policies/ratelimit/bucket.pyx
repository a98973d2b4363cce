# cython: boundscheck=False, wraparound=False, cdivision=True
"""Token buckets and period counters in shared memory, exact across the worker processes of one gateway.

The arena is a file (in the gateway's run_dir, tmpfs where possible) mapped MAP_SHARED by every worker: a
64-byte header and a fixed table of 64-byte slots (one cache line each), open addressing with linear probing,
keyed by a 64-bit hash of the bucket's identity (the caller hashes rule id + consumer/model/... with xxhash).

Every operation locks one slot with a spinlock built on GCC __atomic builtins, does its arithmetic and unlocks,
all inside C with the GIL held: the lock is held for a few nanoseconds and never across Python code. The lock
word holds the owner's pid, so a worker killed inside those nanoseconds cannot wedge the others: a waiter that
spins long enough checks whether the owner still lives and steals the lock if not.

Slots are claimed, never freed: key 0 means empty, and a key is written only under the slot's lock and before
the state is initialised, so a reader that sees the key then takes the lock always sees initialised state. The
table must be sized for the number of distinct buckets (consumers x rules x models ...); `BucketTableFull` is
raised when it is full. Budgets keep one slot per consumer (the period lives in the slot), so slots do not grow
with time.

Time: CLOCK_MONOTONIC in nanoseconds, which is system-wide, so a refill computed by one process is valid in all.
Every operation takes an optional `now_ns` (tests pass explicit times; the gateway passes nothing).

BucketPlan is the rate limiter's hot path: the buckets one kind of request takes from (keys hashed once, when
the plan is made), reserved all-or-none in one call, with the x-ratelimit-* header lines written in C.
"""
from libc.stdint cimport uint64_t, int64_t, uint32_t
from posix.mman cimport munmap

from fastgw.runtime.shm cimport map_shared
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Malloc, PyMem_Free

import os

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #include <sched.h>
    #include <signal.h>
    #include <errno.h>
    #include <unistd.h>

    typedef struct {
        uint32_t lock;      /* 0 = free, else the owner's pid */
        uint32_t _pad0;
        uint64_t key;       /* 0 = empty */
        double tokens;      /* bucket: tokens now; counter: amount used in `stamp`'s period */
        int64_t stamp;      /* bucket: monotonic ns of the last refill; counter: the period id */
        char _pad[32];
    } fgw_slot;

    typedef struct {
        uint64_t magic;
        uint64_t nslots;
        char _pad[48];
    } fgw_header;

    #define FGW_MAGIC 0x314b435542475746ULL  /* "FGWBUCK1" */

    static inline int64_t fgw_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static inline void fgw_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }

    static inline void fgw_lock(uint32_t *l, uint32_t me) {
        uint32_t spins = 0;
        for (;;) {
            uint32_t expected = 0;
            if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return;
            /* Spin on a plain load (no cache-line ping-pong), yield the CPU now and then: on a busy machine
               the owner may have been preempted inside its few-ns critical section. */
            while ((expected = __atomic_load_n(l, __ATOMIC_RELAXED)) != 0) {
                fgw_pause();
                if (++spins % 128 == 0)
                    sched_yield();
                if (spins % 65536 == 0 && kill((pid_t)expected, 0) != 0 && errno == ESRCH) {
                    /* The owner died holding the lock: take it over (its update is lost, not half-done
                       in a way that matters: every field is a whole word). */
                    if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                        return;
                }
            }
        }
    }

    static inline void fgw_unlock(uint32_t *l) {
        __atomic_store_n(l, 0, __ATOMIC_RELEASE);
    }

    static inline uint64_t fgw_load_key(uint64_t *k) { return __atomic_load_n(k, __ATOMIC_ACQUIRE); }
    static inline void fgw_store_key(uint64_t *k, uint64_t v) { __atomic_store_n(k, v, __ATOMIC_RELEASE); }
    """
    ctypedef struct fgw_slot:
        uint32_t lock
        uint64_t key
        double tokens
        int64_t stamp
    ctypedef struct fgw_header:
        uint64_t magic
        uint64_t nslots
    uint64_t FGW_MAGIC
    int64_t fgw_now_ns() nogil
    void fgw_lock(uint32_t* l, uint32_t me) nogil
    void fgw_unlock(uint32_t* l) nogil
    uint64_t fgw_load_key(uint64_t* k) nogil
    void fgw_store_key(uint64_t* k, uint64_t v) nogil


class BucketTableFull(RuntimeError):
    """Every slot of the arena holds another bucket: raise `slots` in the config."""


def monotonic_ns():
    """CLOCK_MONOTONIC in ns, the clock every arena operation uses by default."""
    return fgw_now_ns()


cdef inline void refill(fgw_slot* s, double capacity, double refill_per_s, int64_t now) noexcept nogil:
    # Elapsed time never runs backwards (a caller may pass an older `now`): the stamp only moves forward.
    cdef int64_t elapsed = now - s.stamp
    if elapsed > 0:
        if s.tokens < capacity:
            s.tokens = s.tokens + (<double>elapsed * 1e-9) * refill_per_s
            if s.tokens > capacity:
                s.tokens = capacity
        s.stamp = now


cdef class BucketArena:
    """A table of token buckets shared by every process that opens the same file.

    BucketArena(path, slots=65536) creates the file (or opens it; `slots` must then match) and maps it.
    A bucket is identified by a 64-bit key; it starts full on first use.
    """

    def __cinit__(self):
        self.base = NULL
        self.slots = NULL
        self.size = 0
        self.mask = 0

    def __init__(self, str path, Py_ssize_t slots=65536):
        if slots < 8 or (slots & (slots - 1)) != 0:
            raise ValueError("slots must be a power of two >= 8")
        cdef Py_ssize_t size = sizeof(fgw_header) + slots * sizeof(fgw_slot)
        self.base = map_shared(path, size, f"bucket arena of {slots} slots")   # racers write the same header
        self.size = size
        cdef fgw_header* h = <fgw_header*>self.base
        if h.magic == 0:
            h.nslots = slots
            h.magic = FGW_MAGIC
        elif h.magic != FGW_MAGIC or h.nslots != <uint64_t>slots:
            self._unmap()
            raise ValueError(f"{path}: not a bucket arena of {slots} slots")
        self.slots = self.base + sizeof(fgw_header)
        self.mask = <uint64_t>(slots - 1)
        self.path = path
        self.me = <uint32_t>os.getpid()

    def __dealloc__(self):
        self._unmap()

    cdef void _unmap(self) noexcept:
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
            self.slots = NULL

    def close(self):
        """Unmap (the file stays for the other processes)."""
        self._unmap()

    def after_fork(self):
        """Call in a child that inherited the mapping: locks are owned by pid."""
        self.me = <uint32_t>os.getpid()

    @property
    def capacity(self):
        """The number of slots."""
        return <Py_ssize_t>(self.mask + 1)

    cdef void* _find(self, uint64_t key, double init_tokens, int64_t init_stamp) except NULL:
        """The slot of `key`, locked; claimed and initialised (tokens, stamp) if new."""
        if self.slots == NULL:
            raise ValueError("arena is closed")
        if key == 0:
            key = 0x9E3779B97F4A7C15ULL     # 0 marks empty slots
        cdef uint64_t i = key & self.mask
        cdef uint64_t n = 0
        cdef fgw_slot* s
        cdef uint64_t k
        while n <= self.mask:
            s = &(<fgw_slot*>self.slots)[i]
            k = fgw_load_key(&s.key)
            if k == key:
                fgw_lock(&s.lock, self.me)
                return s
            if k == 0:
                fgw_lock(&s.lock, self.me)
                k = s.key
                if k == 0:
                    s.tokens = init_tokens
                    s.stamp = init_stamp
                    fgw_store_key(&s.key, key)
                    return s
                if k == key:
                    return s
                fgw_unlock(&s.lock)
            i = (i + 1) & self.mask
            n += 1
        raise BucketTableFull(f"{self.path}: all {self.mask + 1} slots are in use")

    cpdef tuple take(self, uint64_t key, double capacity, double refill_per_s, double amount, int64_t now_ns=-1):
        """Check and take in one step: (ok, remaining). Refused (ok False) when fewer than `amount` tokens
        are left; nothing is taken then. `remaining` is the tokens left after the operation (may be negative
        after a settle that took more than was there)."""
        cdef int64_t now = now_ns if now_ns >= 0 else fgw_now_ns()
        cdef fgw_slot* s = <fgw_slot*>self._find(key, capacity, now)
        refill(s, capacity, refill_per_s, now)
        cdef bint ok = s.tokens >= amount
        if ok:
            s.tokens -= amount
        cdef double rem = s.tokens
        fgw_unlock(&s.lock)
        return (ok, rem)

    cpdef double give_back(self, uint64_t key, double capacity, double refill_per_s, double amount,
                           int64_t now_ns=-1) except? -1e300:
        """Settle: add `amount` tokens back (capped at capacity); a negative amount takes more, never refusing
        (the bucket may go below zero, which delays the next admissions). Returns the tokens left."""
        cdef int64_t now = now_ns if now_ns >= 0 else fgw_now_ns()
        cdef fgw_slot* s = <fgw_slot*>self._find(key, capacity, now)
        refill(s, capacity, refill_per_s, now)
        s.tokens += amount
        if s.tokens > capacity:
            s.tokens = capacity
        cdef double rem = s.tokens
        fgw_unlock(&s.lock)
        return rem

    cpdef double peek(self, uint64_t key, double capacity, double refill_per_s, int64_t now_ns=-1) except? -1e300:
        """The tokens a take would see now (refilled), without taking any."""
        cdef int64_t now = now_ns if now_ns >= 0 else fgw_now_ns()
        cdef fgw_slot* s = <fgw_slot*>self._find(key, capacity, now)
        refill(s, capacity, refill_per_s, now)
        cdef double rem = s.tokens
        fgw_unlock(&s.lock)
        return rem

    cpdef tuple charge(self, uint64_t key, int64_t period, double limit, double amount, bint check=True,
                       bint keep_debt=False):
        """A per-period counter (budgets): the amount used so far in `period` (an id such as the day number;
        a different period than the stored one starts again from zero, or with `keep_debt` from what was
        used beyond zero: the hybrid limiter's pools, where used > 0 is a debt). With `check`, refuse (ok False,
        nothing added) when used + amount > limit; without, always add (a settle; amount may be negative).
        Returns (ok, used after the operation)."""
        cdef fgw_slot* s = <fgw_slot*>self._find(key, 0.0, period)
        if period < s.stamp:
            if not check:
                # A late settle for a period already over: charge nothing to the new one.
                fgw_unlock(&s.lock)
                return (True, 0.0)
            period = s.stamp        # the wall clock stepped back: count in the stored (newer) period
        elif period > s.stamp:
            s.stamp = period
            if not (keep_debt and s.tokens > 0.0):
                s.tokens = 0.0
        cdef bint ok = (not check) or s.tokens + amount <= limit
        if ok:
            s.tokens += amount
        cdef double used = s.tokens
        fgw_unlock(&s.lock)
        return (ok, used)

    cpdef double used(self, uint64_t key, int64_t period, bint keep_debt=False):
        """The amount counted in `period` so far (0 for another period; with `keep_debt`, a later period
        starts from the debt of the stored one, as in charge)."""
        cdef fgw_slot* s = <fgw_slot*>self._find(key, 0.0, period)
        cdef double used = s.tokens if s.stamp == period else (
            s.tokens if keep_debt and s.stamp < period and s.tokens > 0.0 else 0.0)
        fgw_unlock(&s.lock)
        return used

    def in_use(self):
        """How many slots hold a bucket (a scan: for metrics and tests, not the hot path)."""
        cdef uint64_t i, n = 0
        if self.slots == NULL:
            raise ValueError("arena is closed")
        for i in range(self.mask + 1):
            if fgw_load_key(&(<fgw_slot*>self.slots)[i].key) != 0:
                n += 1
        return n


# ------------------------------------------------------------------------------------ plans of buckets

cdef enum:
    HDR_MAX = 160          # bytes of one kind's header lines but the numbers (checked in BucketPlan())


cdef char* put_int(char* o, long long v) noexcept:
    cdef char tmp[24]
    cdef int n = 0
    if v < 0:
        o[0] = 45
        o += 1
        v = -v
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    while n:
        n -= 1
        o[0] = tmp[n]
        o += 1
    return o


cdef char* put_duration(char* o, double s) noexcept:
    """OpenAI's reset format, as fastgw.policies.ratelimit.policy.format_duration: "20ms", "1.5s", "6m0s", "1h2m3s"."""
    if s > 1e15:                 # a bucket deep in debt: 31 million years is as good as forever (no overflow)
        s = 1e15
    cdef long long ms = <long long>(s * 1000 + 0.5)
    cdef long long m, h, frac
    if ms <= 0:
        if s <= 0:
            o[0] = 48
            o[1] = 115
            return o + 2
        ms = 1
    if ms < 1000:
        o = put_int(o, ms)
        o[0] = 109
        o[1] = 115
        return o + 2
    m = ms // 60000
    ms = ms % 60000
    if m:
        h = m // 60
        m = m % 60
        if h:
            o = put_int(o, h)
            o[0] = 104
            o += 1
        o = put_int(o, m)
        o[0] = 109
        o += 1
    o = put_int(o, ms // 1000)
    frac = ms % 1000
    if frac:
        o[0] = 46
        o[1] = <char>(48 + frac // 100)
        o[2] = <char>(48 + frac // 10 % 10)
        o[3] = <char>(48 + frac % 10)
        o += 4
        while (o - 1)[0] == 48:   # "1.500" -> "1.5"
            o -= 1
    o[0] = 115
    return o + 1


def format_reset(double seconds):
    """The reset format of the x-ratelimit-reset-* headers (the C code they use; for tests)."""
    cdef char buf[64]
    cdef char* end = put_duration(buf, seconds)
    return buf[:end - buf].decode("ascii")


cdef class BucketPlan:
    """The buckets one kind of request takes from, in order, each a requests bucket (takes 1) or a tokens
    bucket (takes the request's token estimate), with the constant parts of its x-ratelimit-* header lines.

    BucketPlan(keys, capacities, rates, is_tokens, heads): heads[i] = (head, mid) with head =
    b"x-ratelimit-limit-<kind>: <cap>\\r\\nx-ratelimit-remaining-<kind>: " and mid =
    b"\\r\\nx-ratelimit-reset-<kind>: ". Made once per (rule set, consumer, model...) and cached by the
    caller: reserve() then does the whole admission in C.
    """

    def __cinit__(self):
        self.n = 0
        self.keys = NULL
        self.caps = NULL
        self.rates = NULL
        self.tok = NULL
        self.rem = NULL

    def __init__(self, keys, capacities, rates, is_tokens, heads):
        cdef Py_ssize_t n = len(keys), i
        if not (len(capacities) == len(rates) == len(is_tokens) == len(heads) == n):
            raise ValueError("keys, capacities, rates, is_tokens and heads must have the same length")
        self.keys = <uint64_t*>PyMem_Malloc(n * sizeof(uint64_t) + 1)
        self.caps = <double*>PyMem_Malloc(n * sizeof(double) + 1)
        self.rates = <double*>PyMem_Malloc(n * sizeof(double) + 1)
        self.rem = <double*>PyMem_Malloc(n * sizeof(double) + 1)
        self.tok = <unsigned char*>PyMem_Malloc(n + 1)
        if self.keys == NULL or self.caps == NULL or self.rates == NULL or self.rem == NULL or self.tok == NULL:
            raise MemoryError()
        self.has_tokens = False
        for i in range(n):
            self.keys[i] = keys[i]
            self.caps[i] = capacities[i]
            self.rates[i] = rates[i]
            self.tok[i] = 1 if is_tokens[i] else 0
            self.rem[i] = 0.0
            if is_tokens[i]:
                self.has_tokens = True
            head, mid = heads[i]
            if len(head) + len(mid) > HDR_MAX:
                raise ValueError("header parts too long")
        self.heads = [(bytes(h), bytes(m)) for h, m in heads]
        self.n = n
        self.headers = b""

    def __dealloc__(self):
        PyMem_Free(self.keys)
        PyMem_Free(self.caps)
        PyMem_Free(self.rates)
        PyMem_Free(self.rem)
        PyMem_Free(self.tok)

    def __len__(self):
        return self.n

    cpdef Py_ssize_t reserve(self, BucketArena arena, double tokens, bint headers=True, int64_t now_ns=-1) except -2:
        """Take 1 from every requests bucket and `tokens` from every tokens bucket, all or none (a refusal
        gives back what earlier buckets gave). Returns -1 when admitted, else the index of the first bucket
        that refused. Then `remaining(i)` is what each bucket had left (up to the refusing one), and, when
        admitted with `headers`, `self.headers` holds the x-ratelimit-* lines of the tightest requests bucket
        and the tightest tokens bucket (b"" otherwise). Valid until the next reserve on this plan."""
        cdef int64_t now = now_ns if now_ns >= 0 else fgw_now_ns()
        cdef Py_ssize_t i, j
        cdef fgw_slot* s
        cdef double amount
        cdef bint ok
        self.headers = b""
        for i in range(self.n):
            amount = tokens if self.tok[i] else 1.0
            try:
                s = <fgw_slot*>arena._find(self.keys[i], self.caps[i], now)
            except BaseException:
                self._give_back(arena, i, tokens, now)
                raise
            refill(s, self.caps[i], self.rates[i], now)
            ok = s.tokens >= amount
            if ok:
                s.tokens -= amount
            self.rem[i] = s.tokens
            fgw_unlock(&s.lock)
            if not ok:
                self._give_back(arena, i, tokens, now)
                return i
        if headers:
            self.headers = self._header_lines()
        return -1

    cdef void _give_back(self, BucketArena arena, Py_ssize_t upto, double tokens, int64_t now) except *:
        cdef Py_ssize_t j
        cdef fgw_slot* s
        for j in range(upto):
            s = <fgw_slot*>arena._find(self.keys[j], self.caps[j], now)
            refill(s, self.caps[j], self.rates[j], now)
            s.tokens += tokens if self.tok[j] else 1.0
            if s.tokens > self.caps[j]:
                s.tokens = self.caps[j]
            fgw_unlock(&s.lock)

    cdef bytes _header_lines(self):
        # The tightest bucket of each kind speaks for it, as a single OpenAI limit would.
        cdef Py_ssize_t i, ir = -1, it = -1, k
        cdef char buf[2 * (HDR_MAX + 80)]
        cdef char* o = buf
        cdef bytes head, mid
        cdef double left
        for i in range(self.n):
            if not self.tok[i]:
                if ir < 0 or self.rem[i] < self.rem[ir]:
                    ir = i
            elif it < 0 or self.rem[i] < self.rem[it]:
                it = i
        for k in range(2):
            i = ir if k == 0 else it
            if i < 0:
                continue
            head, mid = self.heads[i]
            left = self.rem[i]
            memcpy(o, <char*>head, len(head))
            o += len(head)
            o = put_int(o, <long long>left if left > 0 else 0)
            memcpy(o, <char*>mid, len(mid))
            o += len(mid)
            if self.rates[i] > 0:
                o = put_duration(o, (self.caps[i] - left) / self.rates[i])
            else:
                o = put_duration(o, 0.0)
            o[0] = 13
            o[1] = 10
            o += 2
        return buf[:o - buf]

    def header_lines(self, remaining):
        """The x-ratelimit-* lines for remaining[i] tokens left in bucket i (backends that take elsewhere)."""
        cdef Py_ssize_t i
        if len(remaining) != self.n:
            raise ValueError("one remaining figure per bucket")
        for i in range(self.n):
            self.rem[i] = remaining[i]
        return self._header_lines()

    def remaining(self, Py_ssize_t i):
        """Tokens left in bucket i after the last reserve (for a refusal: what the refusing one had)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.rem[i]

    cpdef void settle(self, BucketArena arena, double reserved, double actual, int64_t now_ns=-1) except *:
        """After the response: every tokens bucket gets `reserved - actual` back (negative: takes more,
        never refusing). Requests buckets are not touched."""
        cdef int64_t now = now_ns if now_ns >= 0 else fgw_now_ns()
        cdef double diff = reserved - actual
        cdef Py_ssize_t i
        cdef fgw_slot* s
        if diff == 0:
            return
        for i in range(self.n):
            if not self.tok[i]:
                continue
            s = <fgw_slot*>arena._find(self.keys[i], self.caps[i], now)
            refill(s, self.caps[i], self.rates[i], now)
            s.tokens += diff
            if s.tokens > self.caps[i]:
                s.tokens = self.caps[i]
            fgw_unlock(&s.lock)
