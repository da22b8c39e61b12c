"""knowedit.heap: the editing process's allocator setting, and the user's say over it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")

PROBE = """
import json, sys, torch
from knowedit.heap import release_large_buffers

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

applied = release_large_buffers()
again = release_large_buffers(1 << 20)  # once per process: the first answer stands
base = rss_mb()
for _ in range(3):  # each 24 MiB buffer is written, then freed
    x = torch.ones(6 << 20)
    del x
print(json.dumps({"applied": applied, "again": again, "kept_mb": rss_mb() - base}))
"""


def _probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "KNOWEDIT_MMAP_THRESHOLD")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_threshold_is_fixed_once_and_freed_buffers_leave_the_process() -> None:
    got = _probe()
    assert got["applied"] == 16 << 20 and got["again"] == 16 << 20
    # With a fixed threshold a freed 24 MiB buffer is unmapped; glibc's own rule keeps it in the heap.
    assert got["kept_mb"] < 8, got
    left_alone = _probe(KNOWEDIT_MMAP_THRESHOLD="0")
    assert left_alone["applied"] == 0
    assert left_alone["kept_mb"] > 16, left_alone  # the measurement above can tell the two apart


def test_the_users_settings_win() -> None:
    assert _probe(MALLOC_MMAP_THRESHOLD_="131072")["applied"] == 0
    assert _probe(KNOWEDIT_MMAP_THRESHOLD=str(8 << 20))["applied"] == 8 << 20


def test_a_malformed_setting_warns_and_changes_nothing() -> None:
    full = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    full["KNOWEDIT_MMAP_THRESHOLD"] = "16M"
    code = "import warnings; warnings.simplefilter('error'); from knowedit.heap import release_large_buffers; release_large_buffers()"
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert out.returncode != 0 and "KNOWEDIT_MMAP_THRESHOLD='16M' is not a number of bytes" in out.stderr
