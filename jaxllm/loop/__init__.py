"""The one training loop and its side concerns, one module each.

    loop.py           the loop: step, time (tokens/s, MFU), call the hooks; `default_hooks`
    hooks.py          the hook protocol (`Hook`: on_start, before_step, after_step, on_end) and `LoopRun`,
                      the loop's state the hooks share
    context.py        RunContext: what the loop runs on (built by `jaxllm.train.setup`)
    metrics_log.py    metrics.jsonl + TensorBoard every logged step; summary.json at the end
    progress.py       the tqdm bar
    spike_guard.py    skip non-finite or spiking updates; halt or roll back after too many in a row
    evaluation.py     periodic and final evaluation; the best checkpoint by an eval metric
    checkpointing.py  periodic and final checkpoints
    signals.py        SIGTERM/SIGINT and multi-host preemption: save and stop at a step boundary
"""
