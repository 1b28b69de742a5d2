"""`python -m jaxllm.cli ...`: the same as the `jaxllm` command."""

import sys

from jaxllm.cli import main

sys.exit(main())
