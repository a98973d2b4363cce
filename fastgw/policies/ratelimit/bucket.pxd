# Declarations of fastgw.policies.ratelimit.bucket for other Cython modules (cimport). See bucket.pyx for the docs.
from libc.stdint cimport uint64_t, int64_t, uint32_t

cdef class BucketArena:
    cdef char* base
    cdef char* slots          # fgw_slot[mask + 1], see bucket.pyx
    cdef Py_ssize_t size
    cdef uint64_t mask
    cdef uint32_t me
    cdef readonly str path

    cdef void _unmap(self) noexcept
    cdef void* _find(self, uint64_t key, double init_tokens, int64_t init_stamp) except NULL
    cpdef tuple take(self, uint64_t key, double capacity, double refill_per_s, double amount, int64_t now_ns=*)
    cpdef double give_back(self, uint64_t key, double capacity, double refill_per_s, double amount,
                           int64_t now_ns=*) except? -1e300
    cpdef double peek(self, uint64_t key, double capacity, double refill_per_s, int64_t now_ns=*) except? -1e300
    cpdef tuple charge(self, uint64_t key, int64_t period, double limit, double amount, bint check=*,
                       bint keep_debt=*)
    cpdef double used(self, uint64_t key, int64_t period, bint keep_debt=*)


cdef class BucketPlan:
    cdef Py_ssize_t n
    cdef uint64_t* keys
    cdef double* caps
    cdef double* rates
    cdef unsigned char* tok       # 1: a tokens bucket, 0: a requests bucket
    cdef double* rem              # left after the last reserve
    cdef list heads               # (head, mid) header parts per bucket
    cdef readonly bint has_tokens
    cdef readonly bytes headers   # x-ratelimit-* lines of the last admitted reserve

    cpdef Py_ssize_t reserve(self, BucketArena arena, double tokens, bint headers=*, int64_t now_ns=*) except -2
    cdef void _give_back(self, BucketArena arena, Py_ssize_t upto, double tokens, int64_t now) except *
    cdef bytes _header_lines(self)
    cpdef void settle(self, BucketArena arena, double reserved, double actual, int64_t now_ns=*) except *
