"""Profiles of the worker while a figure is measured (``python -m bench --profile DIR``).

py-spy samples the worker from outside (``py-spy record --format raw``: collapsed stacks, idle
samples left out, so the counts are CPU time). ``python -m bench.profile FILE`` summarises a
profile: the functions with the most samples on top of the stack (self) and anywhere on it
(total). py-spy is not a dependency: ``pip install py-spy`` into the venv first.
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

from tests.harness import end_process

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    """The py-spy executable: the venv's, else the PATH's."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy into the venv")
    return found


class Profiler:
    """Records one process at a time into ``out_dir/<name>.txt``; does nothing without a dir."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._path: Path | None = None

    def start(self, pid: int, name: str) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.out_dir / f"{name}.txt"
        self._process = subprocess.Popen(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self._path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> Path | None:
        """Stop recording and write the profile; returns its path."""
        process, self._process = self._process, None
        if process is None:
            return None
        end_process(process, signal.SIGINT, 30.0)
        return self._path


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    where = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{match['function']} ({where})"


def summarize(path: Path, top: int = 25) -> str:
    """The heaviest functions of a raw py-spy profile, self and total, in share of samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for function in set(frames):
            total[function] += count
    lines = [f"{path.name}: {samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"-- {title}")
        for function, count in counter.most_common(top):
            lines.append(f"{100 * count / max(samples, 1):5.1f}%  {function}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="raw profiles from --profile")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table")
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarize(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
