import platform

from scan_deploy.allocator import keep_freed_memory


def test_thresholds_are_accepted_on_glibc():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
