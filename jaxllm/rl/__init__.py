"""On-policy learning from feedback: the model answers, the answers are scored, the update pulls the
good ones closer and pushes the bad ones away. Also `jaxllm score` (a reward model over a file).

Modules: `rewards` (samples, registered reward functions, reward model, self-judge, `Rewards`),
`update` (rollout rows, scores, advantages, the policy loss), `rollouts` (the stage between steps and
its loop hooks, `rollout_hooks`), `scoring` (`jaxllm score`).

One step of `train.stage: rl` (built on the one loop, `jaxllm.train.run_loop`):

    prompt batch k  (P prompts, a pure function of (train.seed, k))
      -> rollout     G answers per prompt, sampled with the current params (jaxllm.generate, KV cache)
      -> rewards     rl.reward: registered functions ("exact_match", "contains", "finished", ...),
                     "reward_model" (a trained scalar head), "self_judge" (the policy grades its own
                     answer; the parsed grade is the reward), or a weighted sum "exact_match+0.1*finished"
      -> advantages  a registered estimator (jaxllm.losses.ADVANTAGE_ESTIMATORS: reinforce, rloo, grpo),
                     or GAE over a value head for ppo
      -> update      a registered policy loss (jaxllm.losses.POLICY_LOSSES, "clipped" by default) with a
                     KL penalty to the frozen reference (for ppo the KL is in the per-token reward,
                     InstructGPT-style, and a clipped value loss is added).

Shapes: P prompts per step, G group size, B = P * G rows (contiguous groups), W = prompt width
(fixed by the prompt iterator) + N = rl.max_new_tokens. Rows are right-padded: [prompt, answer, EOS,
pad...], segment id 1 on real tokens, loss mask 1 on the answer tokens and their EOS.

With rl.updates_per_batch = U > 1, the same rollout serves U consecutive optimizer steps (update k
uses prompt batch k // U); the importance ratio against the rollout's log-probs then matters and the
clipping bounds it. train.batch_size must equal P * G (the update batch is every sampled answer).
"""
