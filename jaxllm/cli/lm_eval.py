"""`jaxllm lm-eval ARGS`: lm-evaluation-harness's own command line, with the jaxllm model registered
(importing jaxllm.lm_eval_adapter registers it)."""

from __future__ import annotations

import sys

from jaxllm.errors import UsageError
from jaxllm.lm_eval_adapter import HAVE_LM_EVAL, INSTALL_HINT


def lm_eval_command(argv: list[str]) -> int:
    """Hands ARGS to the harness's parser (`lm-eval --model jaxllm --model_args checkpoint=DIR --tasks ...`)."""
    if not HAVE_LM_EVAL:
        raise UsageError(INSTALL_HINT)
    from lm_eval.__main__ import cli_evaluate  # an optional extra, checked above

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
