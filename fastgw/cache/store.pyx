# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The response cache's in-memory backend: a bounded byte ring in shared memory, one per gateway.

A file in the gateway's run_dir (tmpfs where possible), mapped MAP_SHARED by every worker, so a response one
worker stored is a hit in every other one. It is made fresh at each start (the run_dir is), so nothing survives a
restart. Layout:

    header (64 bytes)   magic, capacity (ring bytes), nsets, head (the absolute write position, only grows)
    index               nsets x WAYS slots {tag: key's low 64 bits, pos + 1 (0 = empty)}
    ring                `capacity` bytes of records {key (16 bytes), value length, expiry, value}, 8-aligned

Log-structured, oldest overwritten ("LRU or similar": FIFO by insertion): a put reserves the next bytes of the
ring with one compare-and-swap on `head` (a record never wraps: the rest of a lap too short for it is skipped),
writes its record there, then points an index slot at it (the key's set; the slot with its tag, else an empty one,
else the oldest). Memory is bounded by construction: the file's size never changes.

No locks. A record at absolute position p is intact while head <= p + capacity (no later reservation reached its
bytes); a reader copies the value out, then checks head again (after a fence), and checks the record's own key
and length against what it asked for, so a torn index slot, a record being overwritten while read, or a slot
pointing at bytes another key owns now all read as a miss, never as another key's data. A writer that dies
midway leaves a reservation nobody points at: the space is skipped, and reused on the next lap.

Expiry is wall-clock seconds (CLOCK_REALTIME: every process agrees). tests/unit/test_cache_store.py runs it
against the plain-Python RingReference below and across writer processes.
"""
from libc.stdint cimport uint64_t, uint32_t
from libc.string cimport memcpy, memcmp
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>

    typedef struct {
        uint64_t magic;
        uint64_t capacity;
        uint64_t nsets;
        uint64_t head;
        char _pad[32];
    } fgc_header;

    typedef struct {
        uint64_t tag;
        uint64_t pos1;      /* absolute position + 1; 0 = empty */
    } fgc_slot;

    typedef struct {
        unsigned char key[16];
        uint64_t len;
        double expires;
    } fgc_record;

    #define FGC_MAGIC 0x3145484341435746ULL  /* "FWCACHE1" */
    #define FGC_WAYS 4

    static inline uint64_t fgc_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fgc_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int fgc_cas(uint64_t *p, uint64_t expected, uint64_t v) {
        return __atomic_compare_exchange_n(p, &expected, v, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    }
    static inline void fgc_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline double fgc_wall(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    }
    """
    ctypedef struct fgc_header:
        uint64_t magic, capacity, nsets, head
    ctypedef struct fgc_slot:
        uint64_t tag, pos1
    ctypedef struct fgc_record:
        unsigned char key[16]
        uint64_t len
        double expires
    uint64_t FGC_MAGIC
    int FGC_WAYS
    uint64_t fgc_load(uint64_t* p) noexcept nogil
    void fgc_store(uint64_t* p, uint64_t v) noexcept nogil
    bint fgc_cas(uint64_t* p, uint64_t expected, uint64_t v) noexcept nogil
    void fgc_fence() noexcept nogil
    double fgc_wall() noexcept nogil


cdef inline uint64_t _tag(const unsigned char* key) noexcept:
    cdef uint64_t t
    memcpy(&t, key + 8, 8)
    return t if t != 0 else 1


cdef inline uint64_t _record_bytes(uint64_t n) noexcept:
    return (sizeof(fgc_record) + n + 7) & ~(<uint64_t>7)


def layout(long long size):
    """(ring capacity, index sets) for a store of `size` bytes in all: about one index slot per 1 KB of ring."""
    if size < 64 * 1024:
        raise ValueError("a cache store needs at least 64 KiB")
    cdef long long nsets = 4
    while nsets * 4 * 1024 < size:        # about one slot (16 bytes) per KB of ring: ~1.6% of the size
        nsets *= 2
    cdef long long capacity = size - sizeof(fgc_header) - nsets * 4 * sizeof(fgc_slot)
    return capacity & ~7, nsets


cdef class SharedStore:
    """SharedStore(path, size): creates (or opens, same size) the store's file and maps it.

    get(key16, now=None) -> bytes | None; put(key16, value, ttl, now=None) -> bool (False: too large for the ring).
    `key16` is the 16-byte digest of the request's canonical form (fastgw.cache.key)."""

    cdef char* base
    cdef Py_ssize_t size
    cdef fgc_header* h
    cdef fgc_slot* slots
    cdef char* ring
    cdef readonly uint64_t capacity
    cdef uint64_t setmask
    cdef readonly str path

    def __cinit__(self):
        self.base = NULL

    def __init__(self, str path, long long size):
        cap_o, sets_o = layout(size)
        cdef uint64_t capacity = cap_o, nsets = sets_o
        cdef Py_ssize_t total = sizeof(fgc_header) + nsets * FGC_WAYS * sizeof(fgc_slot) + capacity
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                os.ftruncate(fd, total)      # two processes racing here truncate to the same size
            elif st.st_size != total:
                raise ValueError(f"{path}: cache store has {st.st_size} bytes, expected {total}")
            p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                raise OSError(f"{path}: mmap failed")
        finally:
            os.close(fd)
        self.base = <char*>p
        self.size = total
        self.h = <fgc_header*>self.base
        if self.h.magic == 0:
            self.h.capacity = capacity
            self.h.nsets = nsets
            fgc_store(&self.h.magic, FGC_MAGIC)
        elif self.h.magic != FGC_MAGIC or self.h.capacity != <uint64_t>capacity or self.h.nsets != <uint64_t>nsets:
            self._unmap()
            raise ValueError(f"{path}: not a cache store of {size} bytes")
        self.slots = <fgc_slot*>(self.base + sizeof(fgc_header))
        self.ring = self.base + sizeof(fgc_header) + nsets * FGC_WAYS * sizeof(fgc_slot)
        self.capacity = capacity
        self.setmask = nsets - 1
        self.path = path

    def __dealloc__(self):
        self._unmap()

    cdef void _unmap(self) noexcept:
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def close(self):
        self._unmap()

    @property
    def file_bytes(self):
        """The whole mapping: what this store can ever take of memory."""
        return self.size

    @property
    def max_value(self):
        """The largest value a put accepts: a quarter of the ring (so one entry never flushes the whole cache)."""
        return <long long>(self.capacity // 4) - <long long>sizeof(fgc_record)

    cdef inline fgc_slot* _set(self, const unsigned char* key) noexcept:
        cdef uint64_t lo
        memcpy(&lo, key, 8)
        return self.slots + (lo & self.setmask) * FGC_WAYS

    cpdef bytes get(self, bytes key, object now=None):
        if self.base == NULL or PyBytes_GET_SIZE(key) != 16:
            return None
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef double t = fgc_wall() if now is None else <double>now
        cdef fgc_slot* s = self._set(k)
        cdef uint64_t tag = _tag(k), pos1, p, off, n, head
        cdef fgc_record* rec
        cdef fgc_record copy
        cdef bytes out
        cdef int i
        for i in range(FGC_WAYS):
            if fgc_load(&s[i].tag) != tag:
                continue
            pos1 = fgc_load(&s[i].pos1)
            if pos1 == 0:
                continue
            p = pos1 - 1
            head = fgc_load(&self.h.head)
            if head > p + self.capacity:
                return None                  # overwritten since
            off = p % self.capacity
            if off + sizeof(fgc_record) > self.capacity:
                return None
            rec = <fgc_record*>(self.ring + off)
            memcpy(&copy, rec, sizeof(fgc_record))
            n = copy.len
            if memcmp(copy.key, k, 16) != 0 or n > self.capacity or off + _record_bytes(n) > self.capacity:
                return None
            if copy.expires <= t:
                return None
            out = PyBytes_FromStringAndSize(self.ring + off + sizeof(fgc_record), <Py_ssize_t>n)
            fgc_fence()
            if fgc_load(&self.h.head) > p + self.capacity:
                return None                  # a writer reached these bytes while they were copied
            return out
        return None

    cpdef bint put(self, bytes key, bytes value, double ttl, object now=None) except -1:
        if self.base == NULL or PyBytes_GET_SIZE(key) != 16:
            return False
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef uint64_t n = <uint64_t>PyBytes_GET_SIZE(value)
        cdef uint64_t need = _record_bytes(n)
        if need > self.capacity // 4:
            return False
        cdef double t = fgc_wall() if now is None else <double>now
        cdef uint64_t h, start, off
        while True:                          # reserve [start, start + need) of the ring
            h = fgc_load(&self.h.head)
            off = h % self.capacity
            start = h + (self.capacity - off) if off + need > self.capacity else h
            if fgc_cas(&self.h.head, h, start + need):
                break
        cdef fgc_record* rec = <fgc_record*>(self.ring + start % self.capacity)
        memcpy(rec.key, k, 16)
        rec.len = n
        rec.expires = t + ttl
        memcpy(self.ring + start % self.capacity + sizeof(fgc_record), PyBytes_AS_STRING(value), n)
        fgc_fence()
        # Point the key's set at it: the slot holding this key, else an empty one, else the oldest.
        cdef fgc_slot* s = self._set(k)
        cdef uint64_t tag = _tag(k), oldest = <uint64_t>-1, p1
        cdef int i, pick = -1
        for i in range(FGC_WAYS):
            if fgc_load(&s[i].tag) == tag:
                pick = i
                break
        if pick < 0:
            for i in range(FGC_WAYS):
                p1 = fgc_load(&s[i].pos1)
                if p1 < oldest:
                    oldest = p1
                    pick = i
        fgc_store(&s[pick].pos1, 0)          # a reader between these stores sees an empty slot, not a mismatch
        fgc_store(&s[pick].tag, tag)
        fgc_store(&s[pick].pos1, start + 1)
        return True

    def delete(self, bytes key):
        """Forget `key` (its bytes stay until overwritten)."""
        if self.base == NULL or PyBytes_GET_SIZE(key) != 16:
            return
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef fgc_slot* s = self._set(k)
        cdef uint64_t tag = _tag(k)
        cdef int i
        for i in range(FGC_WAYS):
            if fgc_load(&s[i].tag) == tag:
                fgc_store(&s[i].pos1, 0)

    @property
    def head(self):
        return fgc_load(&self.h.head) if self.base != NULL else 0


class RingReference:
    """The plain-Python model of SharedStore's semantics (same layout arithmetic, same eviction), for tests."""

    RECORD = 32

    def __init__(self, size):
        self.capacity, self.nsets = layout(size)
        self.head = 0
        self.sets = [[[0, 0] for _ in range(4)] for _ in range(self.nsets)]
        self.records = {}            # absolute position -> (key, value, expires)

    def _need(self, n):
        return (self.RECORD + n + 7) & ~7

    def _set(self, key):
        return self.sets[int.from_bytes(key[:8], "little") & (self.nsets - 1)]

    @staticmethod
    def _tag(key):
        return int.from_bytes(key[8:16], "little") or 1

    def put(self, key, value, ttl, now):
        need = self._need(len(value))
        if need > self.capacity // 4:
            return False
        off = self.head % self.capacity
        start = self.head + (self.capacity - off) if off + need > self.capacity else self.head
        self.head = start + need
        self.records[start] = (key, value, now + ttl, need)
        s, tag = self._set(key), self._tag(key)
        pick = next((i for i in range(4) if s[i][0] == tag), None)
        if pick is None:
            pick = min(range(4), key=lambda i: s[i][1])
        s[pick][0], s[pick][1] = tag, start + 1
        return True

    def get(self, key, now):
        s, tag = self._set(key), self._tag(key)
        for way in s:
            if way[0] != tag or way[1] == 0:
                continue
            p = way[1] - 1
            if self.head > p + self.capacity:
                return None
            # the bytes at p belong to the record written there last (records of older laps are overwritten)
            k, v, exp, need = self.records[p]
            if k != key or exp <= now:
                return None
            return v
        return None
