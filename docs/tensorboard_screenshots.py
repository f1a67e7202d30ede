"""Screenshots of what the tensorboard plugin logs, as a person sees it in TensorBoard.

    python docs/tensorboard_screenshots.py [--out docs/screenshots] [--epochs 3]

Trains two short runs on the bundled digits data that differ only in their
optimizer (``sgd`` and ``adam``, with the tensorboard and class-accuracy
plugins), starts the real TensorBoard server on them, and photographs its
dashboards (scalars, images, PR curves, HParams) with headless Chromium.  It
installs nothing: it needs ``chromium`` on PATH (Debian: ``apt-get install
chromium``) and ``trainer`` and ``tensorboard`` next to this Python or on PATH.
The runs and the server live in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

#: The two runs: folder name (TensorBoard's run name) and its options.
RUNS = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"],
    "adam": ["--optimizer", "adam", "--lr", "0.001"],
}
#: The pictures: file name, the dashboard and its URL state (TensorBoard's ``tagFilter`` regex,
#: smoothing off for three points a run), window width x height.
PAGES = [
    ("timeseries.png", "timeseries", (1400, 1000)),
    ("scalars.png", "scalars&_smoothingWeight=0&tagFilter=" + quote(r"^(train|val)/(loss|acc)$"), (1280, 800)),
    ("images.png", "images&tagFilter=" + quote(r"^(images/val_batch|class-accuracy/confusion)$"), (1280, 1160)),
    ("pr_curves.png", "pr_curves&tagFilter=" + quote(r"^pr/"), (1600, 900)),
    ("hparams.png", "hparams", (1900, 400)),
]


def tool(name: str) -> str:
    """The path of a program next to this Python (a virtual environment's), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"error: '{name}' is not next to {sys.executable} nor on PATH; install trainer-core (pip install -e .) in this Python")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(trainer: str, runs: Path, epochs: int) -> None:
    """Each run in its folder under ``runs`` (one after the other: two at once only share the
    CPU); a run whose folder already holds a finished run is kept.  A failure stops the script
    with the run's output."""
    for name, options in RUNS.items():
        if (runs / name / "summary.json").exists():
            continue
        command = [trainer, "run", "--run-dir", str(runs / name), "--plugins", "tensorboard,class-accuracy",
                   "--epochs", str(epochs), "--device", "cpu", "-q", *options]
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            sys.exit(f"error: training the '{name}' run failed (exit {done.returncode}): {' '.join(command)}\n{done.stdout}")


def runs_with(url: str, plugin: str) -> list[str]:
    """The runs a TensorBoard plugin has tags of."""
    with urllib.request.urlopen(f"{url}/data/plugin/{plugin}/tags", timeout=5) as answer:
        return list(json.load(answer))


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until TensorBoard lists both runs with their scalars and images loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: tensorboard exited with status {server.returncode} before answering:\n{log.read_text()[-2000:]}")
        try:
            if all(set(runs_with(url, plugin)) >= set(RUNS) for plugin in ("scalars", "images")):
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"error: tensorboard did not list the runs {sorted(RUNS)} within {timeout:.0f} s")


def screenshot(chromium: str, url: str, path: Path, size: tuple[int, int], wait_ms: int, profile: Path) -> None:
    """``url`` as a PNG, after ``wait_ms`` of the page's (virtual) time to fetch its data and draw."""
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                    f"--window-size={size[0]},{size[1]}",
                    f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "screenshots", help="folder for the PNGs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run")
    parser.add_argument("--runs", type=Path, help="keep the runs in this folder (and reuse those already there) "
                                                   "instead of a temporary one")
    parser.add_argument("--wait-ms", type=int, default=15000, help="page time Chromium gives the dashboard to load")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: chromium is not on PATH; install it (Debian: apt-get install chromium) and run again")
    trainer, tensorboard = tool("trainer"), tool("tensorboard")
    args.out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="tb-screenshots-"))
    server = None
    try:
        runs = args.runs or temp / "runs"
        started = time.monotonic()
        train(trainer, runs, args.epochs)
        print(f"trained {', '.join(RUNS)} in {time.monotonic() - started:.0f} s under {runs}")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = temp / "tensorboard.log"
        with log.open("w") as output:  # the server keeps its own copy of the file
            server = subprocess.Popen([tensorboard, "--logdir", str(runs), "--host", "127.0.0.1", "--port", str(port)],
                                      stdout=output, stderr=subprocess.STDOUT)
        wait_for_server(url, server, log)
        for name, fragment, size in PAGES:
            path = args.out / name
            screenshot(chromium, f"{url}/#{fragment}", path, size, args.wait_ms, temp / "chromium")
            print(f"wrote {path} ({path.stat().st_size // 1024} KB): {url}/#{fragment}")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
