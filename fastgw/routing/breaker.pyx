# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Circuit breakers of deployments, shared by the workers of one gateway through shared memory.

A breaker is CLOSED (requests flow, failed attempts are counted), OPEN (the deployment is skipped for
`cooldown_s`) or HALF_OPEN (after the cool-down, `half_open_probes` requests are let through; the first success
closes it, a failure opens it again). It opens after `consecutive_failures` failed attempts in a row, or when
`error_rate` of the attempts in the last `window_s` failed (once there were `min_requests` of them).

The state lives in one 64-byte slot per deployment of a table mapped MAP_SHARED by every worker (a file in the
gateway's run_dir), so one worker learning that a deployment is down is enough: the others skip it from their
next pick. The mechanism is the rate limiter's bucket arena's (fastgw/policies/ratelimit/bucket.pyx): open
addressing by a 64-bit key, a spinlock per slot holding the owner's pid (a waiter steals it from a dead owner),
CLOCK_MONOTONIC nanoseconds, which are system-wide. The key is a hash of the deployment's identity (provider,
URL, model id, key variable), so a config reload keeps the state of every deployment it did not change.
Slots are claimed, never freed.

Cost on the request path: a closed breaker is one atomic load to pick (`available`, `admit`); a success with no
failure counted and no error rate configured writes nothing; everything else takes the slot's lock for a few
nanoseconds. The window of the error rate is two fixed windows weighted like a sliding one.
"""
import hashlib
import os

from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.mman cimport munmap

from fastgw.runtime.shm cimport map_shared

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #include <sched.h>
    #include <signal.h>
    #include <errno.h>
    #include <unistd.h>

    typedef struct {
        uint32_t lock;          /* 0 = free, else the owner's pid */
        uint32_t state;         /* CLOSED, HALF_OPEN, OPEN */
        uint64_t key;           /* 0 = empty */
        int64_t since;          /* ns: when it opened, or when the current half-open probes were let through */
        uint32_t consecutive;   /* failed attempts in a row */
        uint32_t probes;        /* half-open: probes let through since `since` */
        int64_t win_start;      /* ns: start of the current window of the error rate */
        uint32_t cur_total, cur_fail, prev_total, prev_fail;
        uint32_t opens;         /* times opened, by any worker */
        uint32_t _pad;
    } fgb_slot;

    typedef struct {
        uint64_t magic;
        uint64_t nslots;
        char _pad[48];
    } fgb_header;

    #define FGB_MAGIC 0x00314b5242574746ULL  /* "FGWBRK1" */

    static inline int64_t fgb_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static inline void fgb_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }

    /* The bucket arena's lock (bucket.pyx): spin, yield now and then, steal from a dead owner. */
    static inline void fgb_lock(uint32_t *l, uint32_t me) {
        uint32_t spins = 0;
        for (;;) {
            uint32_t expected = 0;
            if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return;
            while ((expected = __atomic_load_n(l, __ATOMIC_RELAXED)) != 0) {
                fgb_pause();
                if (++spins % 128 == 0)
                    sched_yield();
                if (spins % 65536 == 0 && kill((pid_t)expected, 0) != 0 && errno == ESRCH) {
                    if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                        return;
                }
            }
        }
    }

    static inline void fgb_unlock(uint32_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }
    static inline uint32_t fgb_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t fgb_load_key(uint64_t *k) { return __atomic_load_n(k, __ATOMIC_ACQUIRE); }
    static inline void fgb_store_key(uint64_t *k, uint64_t v) { __atomic_store_n(k, v, __ATOMIC_RELEASE); }
    """
    ctypedef struct fgb_slot:
        uint32_t lock
        uint32_t state
        uint64_t key
        int64_t since
        uint32_t consecutive
        uint32_t probes
        int64_t win_start
        uint32_t cur_total, cur_fail, prev_total, prev_fail
        uint32_t opens
    ctypedef struct fgb_header:
        uint64_t magic
        uint64_t nslots
    uint64_t FGB_MAGIC
    int64_t fgb_now_ns() nogil
    void fgb_lock(uint32_t* l, uint32_t me) nogil
    void fgb_unlock(uint32_t* l) nogil
    uint32_t fgb_load32(uint32_t* p) nogil
    uint64_t fgb_load_key(uint64_t* k) nogil
    void fgb_store_key(uint64_t* k, uint64_t v) nogil

STATE_NAMES = ("closed", "half-open", "open")
DEFAULT_SLOTS = 4096


class BreakerTableFull(RuntimeError):
    """Every slot holds another deployment's breaker (slots are never freed; a restart empties the table)."""


def monotonic_ns():
    """The breakers' clock (CLOCK_MONOTONIC, ns): tests pass times on it."""
    return fgb_now_ns()


def deployment_key(str identity):
    """The 64-bit slot key of a deployment's identity string (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")


cdef class BreakerTable:
    """The shared table: BreakerTable(path, slots) creates the file (or maps the existing one)."""

    def __cinit__(self):
        self.base = NULL
        self.slots = NULL

    def __init__(self, str path, Py_ssize_t slots=DEFAULT_SLOTS):
        if slots < 8 or (slots & (slots - 1)) != 0:
            raise ValueError("slots must be a power of two >= 8")
        cdef Py_ssize_t size = sizeof(fgb_header) + slots * sizeof(fgb_slot)
        self.base = map_shared(path, size, "breaker table")   # racers write the same header
        self.size = size
        cdef fgb_header* h = <fgb_header*>self.base
        if h.magic == 0:
            h.nslots = slots
            h.magic = FGB_MAGIC
        elif h.magic != FGB_MAGIC or h.nslots != <uint64_t>slots:
            munmap(self.base, self.size)
            self.base = NULL
            raise ValueError(f"{path}: not a breaker table of {slots} slots")
        self.slots = self.base + sizeof(fgb_header)
        self.mask = <uint64_t>(slots - 1)
        self.path = path
        self.me = <uint32_t>os.getpid()

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    cdef void* _slot(self, uint64_t key) except NULL:
        """The slot of `key`, claimed (closed, zeroed) if new; not locked."""
        if key == 0:
            key = 0x9E3779B97F4A7C15ULL     # 0 marks empty slots
        cdef uint64_t i = key & self.mask, n = 0, k
        cdef fgb_slot* s
        while n <= self.mask:
            s = &(<fgb_slot*>self.slots)[i]
            k = fgb_load_key(&s.key)
            if k == key:
                return s
            if k == 0:
                fgb_lock(&s.lock, self.me)
                k = s.key
                if k == 0:
                    s.state = CLOSED
                    s.since = s.win_start = fgb_now_ns()
                    s.consecutive = s.probes = s.opens = 0
                    s.cur_total = s.cur_fail = s.prev_total = s.prev_fail = 0
                    fgb_store_key(&s.key, key)
                fgb_unlock(&s.lock)
                if k == 0 or k == key:
                    return s
            i = (i + 1) & self.mask
            n += 1
        raise BreakerTableFull(f"{self.path}: all {self.mask + 1} breaker slots are in use")

    def breaker(self, str identity, int consecutive_failures=5, double error_rate=0.0, int min_requests=20,
                double window_s=30.0, double cooldown_s=30.0, int half_open_probes=1):
        """The breaker of the deployment `identity` (its state shared, its thresholds this caller's)."""
        cdef Breaker b = Breaker.__new__(Breaker)
        b.table = self
        b.slot = self._slot(deployment_key(identity))
        b.me = self.me
        b.consecutive_failures = consecutive_failures
        b.error_rate = error_rate
        b.min_requests = min_requests
        b.window_ns = <int64_t>(window_s * 1e9)
        b.cooldown_ns = <int64_t>(cooldown_s * 1e9)
        b.half_open_probes = half_open_probes
        return b

    def in_use(self):
        """Slots holding a breaker (a scan: for tests)."""
        cdef uint64_t i, n = 0
        for i in range(self.mask + 1):
            if fgb_load_key(&(<fgb_slot*>self.slots)[i].key) != 0:
                n += 1
        return n


_TABLES = {}


def table_for(str run_dir, Py_ssize_t slots=DEFAULT_SLOTS):
    """This process's mapping of the gateway's breaker table (one per run_dir; mapped again after a fork)."""
    path = os.path.join(run_dir, f"fastgw-breakers-{slots}.shm")
    k = (path, os.getpid())
    t = _TABLES.get(k)
    if t is None:
        t = _TABLES[k] = BreakerTable(path, slots)
    return t


# -- the state machine, on a slot, at time `now` (ns) -----------------------------------------------------------

cdef inline void _roll(fgb_slot* s, int64_t now, int64_t window) noexcept nogil:
    """Start a new window when the current one is over (the previous one then weighs in, fading)."""
    cdef int64_t el = now - s.win_start
    if el < window:
        return
    if el >= 2 * window:
        s.prev_total = s.prev_fail = 0
        s.win_start = now
    else:
        s.prev_total = s.cur_total
        s.prev_fail = s.cur_fail
        s.win_start += window
    s.cur_total = s.cur_fail = 0


cdef inline void _open(fgb_slot* s, int64_t now) noexcept nogil:
    s.state = OPEN
    s.since = now
    s.probes = 0
    s.opens += 1


cdef inline void _close(fgb_slot* s, int64_t now) noexcept nogil:
    s.state = CLOSED
    s.consecutive = s.probes = 0
    s.cur_total = s.cur_fail = s.prev_total = s.prev_fail = 0
    s.win_start = now


cdef inline int _effective(fgb_slot* s, int64_t now, int64_t cooldown) noexcept nogil:
    """The state as a request would find it: an OPEN breaker whose cool-down is over is HALF_OPEN."""
    cdef uint32_t st = fgb_load32(&s.state)
    if st == OPEN and now - s.since >= cooldown:
        return HALF_OPEN
    return st


cdef class Breaker:
    """One deployment's breaker in one worker: a pointer to its shared slot and the model's thresholds."""

    cdef bint available(self) noexcept:
        """Would a request be let through now? No side effect (a pick may ask about every deployment)."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        if fgb_load32(&s.state) == CLOSED:
            return True
        return self._available(fgb_now_ns())

    cdef bint admit(self) noexcept:
        """Let one request through, if the state allows: always when closed; when half-open, one of its probes
        (taken here, atomically, so the workers together send at most half_open_probes)."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        if fgb_load32(&s.state) == CLOSED:
            return True
        return self._admit(fgb_now_ns())

    cdef bint succeeded(self) noexcept:
        """An attempt on the deployment succeeded; True when that closed the breaker."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        if (fgb_load32(&s.state) == CLOSED and fgb_load32(&s.consecutive) == 0 and self.error_rate == 0.0):
            return False                    # nothing to count: no write to the shared line
        return self._record(True, fgb_now_ns())

    cdef bint failed(self) noexcept:
        """An attempt on the deployment failed; True when that opened the breaker."""
        return self._record(False, fgb_now_ns())

    cdef bint _available(self, int64_t now) noexcept:
        cdef fgb_slot* s = <fgb_slot*>self.slot
        cdef bint ok
        fgb_lock(&s.lock, self.me)
        if s.state == CLOSED:
            ok = True
        elif now - s.since >= self.cooldown_ns:      # open and cooled down, or half-open with its probes' lease over
            ok = True
        else:
            ok = s.state == HALF_OPEN and s.probes < <uint32_t>self.half_open_probes
        fgb_unlock(&s.lock)
        return ok

    cdef bint _admit(self, int64_t now) noexcept:
        cdef fgb_slot* s = <fgb_slot*>self.slot
        cdef bint ok = False
        fgb_lock(&s.lock, self.me)
        if s.state == CLOSED:
            ok = True
        elif now - s.since >= self.cooldown_ns:
            # Open and cooled down: half-open now, this request its first probe. Half-open for a whole
            # cool-down without an answer (a probe's worker died, its client left): a new round of probes.
            s.state = HALF_OPEN
            s.since = now
            s.probes = 1
            ok = True
        elif s.state == HALF_OPEN and s.probes < <uint32_t>self.half_open_probes:
            s.probes += 1
            ok = True
        fgb_unlock(&s.lock)
        return ok

    cdef bint _record(self, bint ok, int64_t now) noexcept:
        """Count one attempt's outcome; True when the state changed (closed by a success, opened by a failure)."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        cdef bint changed = False
        cdef double w, total, fails
        fgb_lock(&s.lock, self.me)
        if s.state == HALF_OPEN:
            if ok:
                _close(s, now)
            else:
                _open(s, now)
            changed = True
        elif s.state == CLOSED:
            if ok:
                s.consecutive = 0
            else:
                s.consecutive += 1
            if self.error_rate > 0.0:
                _roll(s, now, self.window_ns)
                s.cur_total += 1
                if not ok:
                    s.cur_fail += 1
            if not ok:
                if self.consecutive_failures > 0 and s.consecutive >= <uint32_t>self.consecutive_failures:
                    changed = True
                elif self.error_rate > 0.0:
                    w = 1.0 - <double>(now - s.win_start) / <double>self.window_ns
                    total = s.prev_total * w + s.cur_total
                    fails = s.prev_fail * w + s.cur_fail
                    changed = total >= self.min_requests and fails >= self.error_rate * total
                if changed:
                    _open(s, now)
        # OPEN: an answer to a request let through before it opened changes nothing
        fgb_unlock(&s.lock)
        return changed

    # -- for health checks, metrics, status and tests ---------------------------------------------------------

    def allows(self, long long now_ns=-1):
        """`available` at `now_ns` (default: now)."""
        if now_ns < 0:
            return self.available()
        return self._available(now_ns)

    def try_admit(self, long long now_ns=-1):
        """`admit` at `now_ns` (default: now)."""
        if now_ns < 0:
            return self.admit()
        return self._admit(now_ns)

    def record(self, bint ok, long long now_ns=-1):
        """`succeeded` / `failed` at `now_ns` (default: now); True when the state changed."""
        return self._record(ok, now_ns if now_ns >= 0 else fgb_now_ns())

    def force_open(self):
        """A failed health check: open (again) from now; True when it was not open."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        cdef int64_t now = fgb_now_ns()
        fgb_lock(&s.lock, self.me)
        cdef bint was_open = s.state == OPEN
        if was_open:
            s.since = now               # stays open while the checks fail
        else:
            _open(s, now)
        fgb_unlock(&s.lock)
        return not was_open

    def force_close(self):
        """A passed health check: closed; True when it was not."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        fgb_lock(&s.lock, self.me)
        cdef bint was_closed = s.state == CLOSED
        if not was_closed:
            _close(s, fgb_now_ns())
        fgb_unlock(&s.lock)
        return not was_closed

    def state(self, long long now_ns=-1):
        """0 closed, 1 half-open (an open breaker whose cool-down is over counts as half-open), 2 open."""
        return _effective(<fgb_slot*>self.slot, now_ns if now_ns >= 0 else fgb_now_ns(), self.cooldown_ns)

    def info(self):
        """{"state", "consecutive_failures", "opens", "retry_in_s"} of the shared slot (opens: by any worker)."""
        cdef fgb_slot* s = <fgb_slot*>self.slot
        cdef int64_t now = fgb_now_ns()
        cdef int st
        cdef uint32_t consecutive, opens
        cdef double left = 0.0
        fgb_lock(&s.lock, self.me)
        st = _effective(s, now, self.cooldown_ns)
        consecutive, opens = s.consecutive, s.opens
        if st == OPEN:
            left = (s.since + self.cooldown_ns - now) / 1e9
        fgb_unlock(&s.lock)
        return {"state": STATE_NAMES[st], "consecutive_failures": consecutive, "opens": opens,
                "retry_in_s": round(left, 3)}
