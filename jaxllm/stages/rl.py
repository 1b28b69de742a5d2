"""On-policy reinforcement learning (REINFORCE, RLOO, GRPO, PPO): before each update the policy answers
a batch of prompts (rl.group_size answers each), a reward scores the answers (a Python function, a
reward model or the model as judge), and the policy-gradient loss raises the log-probability of the
better ones. The machinery is in jaxllm/rl/; this file plugs it into the one loop."""

from __future__ import annotations

from typing import Any, Callable

from jaxllm.rl import rewards, rollouts, update
from jaxllm.config import Config, ConfigError
from jaxllm.stages.base import RolloutHooks, Stage, register


def _heads(config: Config) -> tuple[str, ...]:
    return ("value",) if config.rl.algorithm == "ppo" else ()


def _validate(config: Config, reward_functions: dict | None = None, **options) -> None:
    for name, fn in (reward_functions or {}).items():  # registered first: rl.reward may name them
        rewards.register_reward(name)(fn)
    rollouts.check_rl_config(config)
    if config.model.final_logit_softcap > 0:
        raise ConfigError(f"model.final_logit_softcap={config.model.final_logit_softcap} is applied by the model's "
                          "logits, which the rl stage's scoring bypasses; use a model without a final softcap")


def _rollouts(context: Any, prompt_batches, log: Callable[[str], None], *, eval_prompts=None,
              reward_functions=None) -> RolloutHooks:
    return RolloutHooks(*rollouts.rollout_hooks(context, prompt_batches, log, eval_prompts=eval_prompts,
                                                reward_functions=reward_functions))


STAGE = register(Stage(name="rl", summary="on-policy REINFORCE / RLOO / GRPO / PPO on rewards of sampled answers",
                       data_format="prompts", loss=update.rl_loss_fn, needs_reference=True, heads=_heads,
                       validate=_validate, batch_spec=update.update_batch_spec, rollouts=_rollouts))
