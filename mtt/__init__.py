"""The package behind buffer.py, distill.py and eval.py: one module per step of the data's way (README.md's layout).

The scripts import it before torch, which takes seconds to load: from then on Ctrl-C and SIGTERM (a cluster's
pre-emption) while a script starts end with one line and status 130, as during its run (parallel.exit_status).
"""
import os
import signal
import sys
from pathlib import Path


def terminate(signum, frame):
    raise KeyboardInterrupt("stopped by SIGTERM")


def stopped_while_starting(kind, value, traceback):
    """sys.excepthook: a KeyboardInterrupt that nothing caught, so one before main() ran."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank 0 says it for the job
        print(f"{str(value) or 'stopped by Ctrl-C'}: nothing was written", file=sys.stderr, flush=True)
    os._exit(130)


if Path(sys.argv[0]).name in ("buffer.py", "distill.py", "eval.py"):
    signal.signal(signal.SIGTERM, terminate)
    sys.excepthook = stopped_while_starting
