# What both backends share about cancel() (textually included by _kvm.pyx and _whp.pyx, after
# _exits.pxi): whether a call is open for cancellation and whether it was cancelled. Each backend's
# Vcpu.cancel() does the test-and-set below and kicks its hypervisor; run() checks
# cancel_requested. No atomics are needed: cancel(), begin_call()/end_call() and run()'s checks all
# hold the GIL (only the hypervisor's run call itself is made without it).

cdef class CancelState(ExitDetails):
    cdef volatile int call_active          # between begin_call() and end_call()
    cdef volatile int cancel_requested
    cdef readonly uint64_t kicks            # times cancel() had to interrupt the hypervisor

    def begin_call(self):
        """Opens a call for cancel(): from now until end_call(), the first cancel() stops it (the
        current or next run() returns EXIT_CANCELLED). A cancel from before is forgotten."""
        self.cancel_requested = 0
        self.call_active = 1

    def end_call(self):
        """Closes the call: cancel() does nothing again (so it cannot poison a later call)."""
        self.call_active = 0

    cdef bint _first_cancel(self):
        """True for the first cancel() of an open call, which must stop it; False for any other
        (no call open, or already cancelled): those cost nothing."""
        if not self.call_active or self.cancel_requested:
            return False
        self.cancel_requested = 1
        return True
