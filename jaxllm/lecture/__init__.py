"""The lecture's analysis tools: experiments and data tools built on the core, data, generation, evaluation and
training layers (nothing below imports them; `cli/` and `pipeline.py` do). Each has its own command.

- `knowledge_experiment`  Physics of LMs 3.1: single vs multi+permute biographies, QA transfer, completion probe
                          (`jaxllm experiment knowledge`)
- `planning`              compute-optimal planning: FLOPs per token, Chinchilla's laws, the iso-FLOP fit (`jaxllm plan`)
- `sweep`                 model sizes trained at fixed FLOP budgets, iso-FLOP curves and their fit (`jaxllm sweep`)
- `selection`             SFT data selection: length, loss, IFD, k-center diversity (`jaxllm data select`)
- `analysis`              knowledge categories (Gekhman et al.) and token shift (URIAL) (`jaxllm analyze`)
- `teacher`               training data from a teacher model: distill, continue, rephrase (`jaxllm data generate`)
- `own_pairs`             preference pairs from a model's own wrong answers, judged by exact match (`jaxllm data
                          pairs`; the pipeline's `own_answers` and `own_mistakes_after`)
- `quality/`              data quality, JAX-free: heuristic rules, exact and MinHash dedup, a classifier, a report
                          (`jaxllm data filter`, `jaxllm data train-quality`)

This file imports nothing, so `jaxllm.lecture.quality` stays JAX-free.
"""
