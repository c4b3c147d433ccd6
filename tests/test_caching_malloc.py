"""Ranks run glibc's malloc as a caching allocator (`run.launcher.caching_malloc`): a freed large
tensor's pages stay with the process for the next step instead of going back to the kernel."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from placewise.run.launcher import caching_malloc

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if sys.argv[1] == "caching" and not caching_malloc():
    print("skip"); raise SystemExit
before = rss()
x = torch.ones(32 << 20)  # 128 MiB, touched
del x
print(rss() - before)
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_tensor_keeps_its_pages_only_with_the_caching_allocator():
    def kept(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=100)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    caching = kept("caching")
    if caching == "skip":
        pytest.skip("the C library is not glibc")
    assert int(caching) > 100 << 20  # still the process's
    assert int(kept("default")) < 16 << 20  # glibc's default gives a block this large back at once
