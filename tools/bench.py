#!/usr/bin/env python
"""`python tools/bench.py ARGS` is `jaxllm bench ARGS`, for a checkout that is not pip-installed.

It goes through the CLI, which re-executes itself once with the glibc malloc settings measured
fastest on CPU (see jaxllm/cli/__init__.py), so timings match what `jaxllm bench` reports.
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

from jaxllm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["jaxllm", "bench", *sys.argv[1:]]
    sys.exit(main())  # as from the command line: the CLI's CPU settings (re-exec) apply
