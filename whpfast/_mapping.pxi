# The host-mapping base class shared by the backends (textually included by _kvm.pyx and
# _whp.pyx; each defines how its mappings are made, and _release(ptr, size, is_file) to undo them).

cdef class Mapping:
    """One host mapping (anonymous guest memory or a read-only file), unmapped exactly once.
    Exposes the buffer protocol; close() refuses while Python views of it are alive, so a view
    can never outlive the memory it shows."""
    cdef uint8_t *ptr
    cdef readonly size_t size
    cdef readonly bint readonly
    cdef bint is_file
    cdef int exports

    def __cinit__(self):
        self.ptr = NULL
        self.exports = 0

    @property
    def address(self):
        if self.ptr == NULL:
            raise errors.SandboxClosed("the mapping is closed")
        return <uint64_t>self.ptr

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.ptr == NULL:
            raise errors.SandboxClosed("the mapping is closed")
        PyBuffer_FillInfo(buffer, self, self.ptr, self.size, self.readonly, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def close(self):
        if self.ptr != NULL:
            if self.exports:
                raise BufferError(f"{self.exports} memoryview(s) of this mapping are still alive")
            _release(self.ptr, self.size, self.is_file)
            self.ptr = NULL

    def __dealloc__(self):
        # Views hold a reference to us, so by now none is alive.
        if self.ptr != NULL:
            _release(self.ptr, self.size, self.is_file)
            self.ptr = NULL




cdef uint64_t _mapped_length(path, uint64_t file_size, uint64_t offset, length) except 0:
    """How many bytes of a file of file_size bytes to map from offset (length None: the rest)."""
    cdef uint64_t n
    if length is None:
        if file_size <= offset:
            raise ValueError(f"{path} is empty: a read-only file mapping needs at least one byte")
        return file_size - offset
    n = length
    if n == 0 or offset + n > file_size:
        raise ValueError(f"{path} has {file_size} bytes; cannot map {n} bytes at offset {offset}")
    return n
