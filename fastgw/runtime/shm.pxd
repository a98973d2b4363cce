# A file mapped MAP_SHARED: the memory a gateway's workers share (see shm.pyx).
cdef char* map_shared(str path, Py_ssize_t size, str what) except NULL
