"""Profiling the server under load with py-spy, and reading the profile.

``python -m bench --profile ...`` records every server it starts with
``py-spy record --nonblocking --function --format raw`` (the server is never
paused) into ``bench/results/profiles/<run>/``, and writes a summary beside each
raw profile. ``python -m bench.profile FILE`` summarizes a raw profile again:
the top frames by self time (where the CPU is spent) and by total time
(which calls it is spent under). Idle samples (the loop waiting in epoll)
are not recorded, so percentages are shares of busy time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .servers import LOADGEN_CPU, pinned

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r".*/(site-packages|lib/python3\.\d+)/")


def py_spy() -> str | None:
    """The py-spy executable (the ``bench`` extra installs it), or ``None``."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, output: Path, rate: int = 250) -> subprocess.Popen[bytes] | None:
    """Start recording ``pid``; stop with :func:`stop`. ``None`` if py-spy is missing."""
    executable = py_spy()
    if executable is None:
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            executable,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--nonblocking",
            "--function",
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pinned(LOADGEN_CPU),
    )


def stop(recorder: subprocess.Popen[bytes], output: Path) -> str | None:
    """Stop the recording (py-spy writes its file on SIGINT); returns the summary."""
    if recorder.poll() is None:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(10)
    if not output.exists():
        return None
    text = summarize(output)
    output.with_suffix(".summary.txt").write_text(text)
    return text


def _short(frame: str) -> str:
    found = _FRAME.match(frame)
    if not found:
        return frame
    where = _SITE.sub("", found["file"]).replace("/work/main/", "")
    return f"{found['name']} ({where})"


def summarize(path: Path, top: int = 25) -> str:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            total_time[frame] += count
    if not samples:
        return f"{path.name}: no samples\n"
    out = [f"{path.name}: {samples} busy samples", "", "top frames by SELF time:"]
    for frame, count in self_time.most_common(top):
        out.append(f"  {100 * count / samples:5.1f}%  {frame}")
    out += ["", "top frames by TOTAL time (self + callees):"]
    for frame, count in total_time.most_common(top):
        out.append(f"  {100 * count / samples:5.1f}%  {frame}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("raw", type=Path, help="a py-spy --format raw file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(args.raw, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
