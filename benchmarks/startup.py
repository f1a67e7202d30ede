"""Start-up cost of the commands people type most: ``trainer --help`` and ``trainer plugins``.

    python benchmarks/startup.py [--repeats 7]

Runs each command in a fresh interpreter, repeated, and prints the median and
min-max wall time, whether torch was imported (``python -X importtime``), and
the slowest imports.  For scale it also times ``python -c 'import torch'``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "trainer --help": ["-m", "trainer_core", "--help"],
    "trainer plugins": ["-m", "trainer_core", "plugins"],
    "import torch (for scale)": ["-c", "import torch"],
}


def wall(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return time.perf_counter() - started


def imports(args: list[str]) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) for top-level imports, slowest first."""
    err = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            rows.append((int(parts[1]), parts[2].strip()))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; {args.repeats} runs each, fresh interpreter every time")
    for name, command in COMMANDS.items():
        wall(command)  # warm the file cache
        times = [wall(command) for _ in range(args.repeats)]
        print(f"  {name:26s} median {statistics.median(times):.3f} s  [{min(times):.3f}-{max(times):.3f}]")
        if command[0] == "-m":
            loaded = imports(command)
            modules = {m for _, m in loaded}
            slowest = ", ".join(f"{m} {us / 1000:.0f} ms" for us, m in loaded[:3])
            print(f"    torch imported: {'yes' if 'torch' in modules else 'no'}; slowest imports: {slowest}")


if __name__ == "__main__":
    main()
