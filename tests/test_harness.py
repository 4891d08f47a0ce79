"""The test harness itself: the end-of-run check sees a process orphaned by a test, however it was started."""

import subprocess
import sys
import time

import pytest

from tests.harness import end_leftovers, end_process_group, leftover_processes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreapers are a Linux feature")
def test_an_orphaned_grandchild_is_seen_and_ended():
    """A shell that starts a sleeper in the background and exits: the sleeper is found and killed at the end."""
    # The sleeper's output goes elsewhere, or run() would wait for it to close the pipe.
    shell = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                           check=True)
    orphan = int(shell.stdout)
    assert orphan in leftover_processes()  # adopted by the run (child subreaper), not by init
    assert orphan in end_leftovers(grace_s=0.5)
    assert orphan not in leftover_processes()


def test_a_server_is_ended_with_its_whole_group():
    """end_process_group ends the children a server started, not only the server."""
    server = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len([p for p, c in leftover_processes().items() if c.startswith("sleep 300")]) < 2:
        assert time.monotonic() < deadline, "the server's children did not start"
        time.sleep(0.05)
    end_process_group(server, timeout_s=10)
    assert not [p for p, c in leftover_processes().items() if c.startswith("sleep 300")]
