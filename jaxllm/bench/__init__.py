"""`jaxllm bench`: how fast a stage's step runs, and how close it comes to the hardware's limit.

    jaxllm bench --preset 25m --stage pretrain --json out.json
    jaxllm bench --preset 1b --stage pretrain --batch-size 8 model.dtype=bfloat16
    jaxllm bench --preset 25m --variant xla:model.attention=xla --variant fused:model.loss_chunk_size=128
    jaxllm bench --preset 25m --levers          # the CPU speed levers, A/B, as a table

What is timed: the jitted step `jaxllm train` runs (`steps.build_train_step`, the same shardings and
donation) on a fixed synthetic batch; `generate` times a KV-cache prefill and a greedy decode loop.
Compile time (lower + compile, ahead of time) is reported apart; step time is the median of
`--steps` timed steps after `--warmup` steps. Several `--variant`s run in one process, interleaved
step by step (A, B, A, B, ...), so noise from other processes hits all of them alike.

Model FLOPs per token (training) = 6 * P + 12 * L * T * N * H, where P counts the matmul parameters
(blocks + output head, not the embedding lookup) and the attention term counts the full T x T
scores (PaLM/nanoGPT convention), whatever a kernel skips. MFU = achieved model FLOP/s / peak
FLOP/s of the devices (a datasheet table, `--peak-tflops` overrides). On CPU the peak is a float32
matmul ceiling measured in the same run, interleaved with the steps: `fraction_of_matmul_ceiling`.

Every result is appended to a JSONL history (`--history`, default ./bench_history.jsonl) with the
git commit, versions and environment, so regressions show up.

Modules: `cases` (settings, the train/generate cases, the matmul probe), `report` (interleaved runs, records,
table, history), `profile` (a trace's device-time breakdown), `run` (run_bench), `levers` (`--levers`: the
CPU speed levers, A/B in one run).
"""
