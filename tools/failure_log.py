"""pytest plugin (`-p failure_log`, with tools/ on sys.path): appends each failure's report to
$FAILURE_LOG as soon as it happens, so a run killed by a time limit still leaves its failures behind."""
import os


def pytest_runtest_logreport(report):
    # under xdist the controller receives every worker's reports: write them there only, once
    if report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(os.environ.get("FAILURE_LOG", "failures.log"), "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
