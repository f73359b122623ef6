"""A probe's resident peak is its own: a small process started by a large one reports its own small peak."""
import subprocess
import sys

from distill.core.probe import resident_peak_mb, run_probe

CHILD = "import json; from distill.core.probe import resident_peak_mb; print(json.dumps({'peak': resident_peak_mb()}))"


def test_a_child_reports_its_own_peak_not_its_parents():
    ballast = bytearray(512 * 2**20)  # touched page by page, so that it is resident
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    parent = resident_peak_mb()
    child = run_probe([sys.executable, "-c", CHILD])["peak"]
    assert parent > 512
    # getrusage's maxrss would report at least the parent's peak here: Linux carries it across fork and exec
    assert child < 200, (child, parent)
    by_rusage = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage("
                                "resource.RUSAGE_SELF).ru_maxrss / 1024)"], capture_output=True, text=True, check=True)
    assert float(by_rusage.stdout) >= parent - 1, "the premise: maxrss starts at the parent's peak"
    del ballast


def test_the_peak_is_at_least_what_this_process_holds_now():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    resident_mb = int(status["VmRSS"].split()[0]) / 2**10
    assert resident_peak_mb() >= resident_mb > 0
