"""Host memory figures for the benchmarks: live heap bytes (the CPU analogue of
`torch.cuda.memory_allocated`), their peak over a block of code, and a child process's peak RSS.

"Live" is what glibc's allocator has handed out and not taken back (`mallinfo2`: in-use arena
bytes + mmapped chunks); RSS overstates it, because glibc keeps freed memory, and counts the pages
of memory-mapped files read. Linux with glibc >= 2.33 only (the benchmarks' machines).

    with PeakLive() as peak:
        step()
    print(peak.bytes / 1e9, "GB at the peak,", live_bytes() / 1e9, "GB now")
    rss = child_peak_rss([sys.executable, "-c", "..."])
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_bytes() -> int:
    """Bytes malloc has handed out and not taken back, in every arena and mmapped chunk."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def trim() -> None:
    """Give freed heap back to the system (so RSS and live agree more closely before a measurement)."""
    _libc.malloc_trim(0)


class PeakLive:
    """Highest `live_bytes()` seen while the block runs, sampled by a thread every `interval` seconds
    (torch allocates big tensors in whole, so a short interval catches the peak)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.bytes, self._stop = interval, 0, threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, live_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakLive:
        self.bytes = live_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, live_bytes())


def child_peak_rss(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `argv` to the end; its own peak RSS in bytes (from wait4, not its parent's or siblings') and stdout."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{output[-3000:]}")
    return usage.ru_maxrss * 1024, output
