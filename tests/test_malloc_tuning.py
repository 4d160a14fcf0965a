"""The CPU allocator settings take effect where glibc is the C library (as on our Linux CI)."""
import platform

import pytest

from engine.malloc_tuning import keep_freed_memory_mapped


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is a glibc interface")
def test_glibc_accepts_the_thresholds():
    assert keep_freed_memory_mapped() is True
