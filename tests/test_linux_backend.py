"""LinuxSandbox on a backend it does not support yet says so."""

import pytest

import whpfast
from whpfast import backend


@pytest.mark.skipif(backend.NAME != "whp", reason="WHP only: LinuxSandbox's message on the WHP backend")
def test_whp_backend_says_kvm_only():
    with pytest.raises(whpfast.HypervisorUnavailable, match="KVM only"):
        whpfast.LinuxSandbox(["/bin/true"])
