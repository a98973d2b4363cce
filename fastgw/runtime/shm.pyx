# cython: language_level=3
"""The memory a gateway's workers share: a file in its run directory (tmpfs where possible) mapped MAP_SHARED by
each of them. The rate-limit buckets, the circuit breakers and the response cache each keep a table in one."""
import os

from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap


cdef char* map_shared(str path, Py_ssize_t size, str what) except NULL:
    """`path` mapped for reading and writing, made `size` bytes long (zeros) if it is new; a file of another size is
    refused (ValueError naming `what`). Unmap with munmap(p, size)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_size == 0:
            os.ftruncate(fd, size)      # two processes racing here truncate to the same size
        elif st.st_size != size:
            raise ValueError(f"{path}: {what} has {st.st_size} bytes, expected {size}")
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(f"{path}: mmap failed")
    finally:
        os.close(fd)
    return <char*>p
