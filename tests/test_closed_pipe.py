"""Listing commands in a pipe whose reader leaves early (``trainer plugins | head -1``)
stop as Unix tools do: no message, exit status 141 (what a shell reports for SIGPIPE)."""

import json
import subprocess
import sys

import pytest

COMMANDS = [["plugins"], ["models"], ["datasets"], ["tasks"], ["recipes"], ["runs", "."], ["--help"], ["run", "--help"]]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_reader_that_closes_first_ends_the_command_quietly(tmp_path, args):
    # The reader closes its end before the command writes: every write meets a closed pipe.
    process = subprocess.Popen([sys.executable, "-m", "trainer_core", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and stderr == ""


def test_head_takes_the_first_line_and_the_command_ends_quietly(tmp_path):
    # A real shell pipeline: the command may have written everything before head left (0) or not (141).
    shell = f"'{sys.executable}' -m trainer_core plugins | head -n 1; echo \"status ${{PIPESTATUS[0]}}\""
    result = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    first, status = result.stdout.splitlines()
    assert "(trainer-core)" in first and status in ("status 0", "status 141") and result.stderr == ""


def test_a_training_run_whose_reader_leaves_stops_quietly_and_keeps_its_folder(tmp_path):
    # `trainer run | head -1`: the progress plugin's next line meets the closed pipe. Not the
    # plugin's failure: the run stops as Unix tools do, and its folder says how it ended.
    process = subprocess.Popen([sys.executable, "-m", "trainer_core", "run", "--epochs", "3", "--run-dir", "run"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"training smallcnn on digits")
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == ""
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("BrokenPipeError")
