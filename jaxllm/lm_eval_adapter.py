"""lm-evaluation-harness adapter: every harness task on jaxllm checkpoints.

    pip install 'jaxllm[lm-eval]'
    jaxllm lm-eval --model jaxllm --model_args checkpoint=runs/sft --tasks hellaswag --batch_size 16

The harness finds models in its own registry, so this module must be imported before it looks:
`jaxllm lm-eval ARGS` (jaxllm.cli.lm_eval) registers the model class and hands
ARGS to the harness's own command line. From Python:

    import jaxllm.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="jaxllm", model_args="checkpoint=runs/sft", tasks=["arc_easy"])

The three request types run on jaxllm's batched (and, under a mesh, sharded) machinery:
- loglikelihood(context, continuation): `evaluate.score_continuations` on BOS + context and the
  continuation (a context's trailing spaces move to the continuation, as the harness's HF model does);
- loglikelihood_rolling(text): `evaluate.score_documents` on BOS + text, windows of model.max_seq_len;
- generate_until(context, gen_kwargs): `evaluate.generate_completions` (KV cache), cut at the `until`
  strings; honours max_gen_toks, do_sample, temperature, top_k, top_p.
`--apply_chat_template` renders conversations with jaxllm's chat template (role markers).
model_args: checkpoint (a training workdir, required), batch_size, max_gen_toks (default 256).
"""

from __future__ import annotations

import logging
from typing import Any

from jaxllm.data.chat import render_text, validate_messages
from jaxllm.errors import UsageError
from jaxllm.evaluate.scoring import EvalModel, generate_completions, score_continuations, score_documents
from jaxllm.generate import SamplingSettings
from jaxllm.tasks.metrics import cut_at_stop

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    HAVE_LM_EVAL = True
except ImportError:  # the adapter is an optional extra
    LM = object  # type: ignore[misc,assignment]
    HAVE_LM_EVAL = False

INSTALL_HINT = "the lm-evaluation-harness adapter needs lm-eval: pip install 'jaxllm[lm-eval]' (or pip install lm-eval)"
_SUPPORTED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}
logger = logging.getLogger(__name__)


def _batch_size(value: Any) -> int:
    """The harness passes ints, digit strings or 'auto' / 'auto:N' (auto is not measured here: 16)."""
    if isinstance(value, int):
        return max(value, 1)
    text = str(value or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 16


class JaxLLM(LM):
    """A jaxllm checkpoint as an lm-evaluation-harness model (registered as "jaxllm")."""

    def __init__(self, checkpoint: str = "", batch_size: Any = 16, max_gen_toks: int = 256, max_batch_size: Any = None,
                 device: Any = None, **unused: Any):
        if not HAVE_LM_EVAL:
            raise UsageError(INSTALL_HINT)
        super().__init__()
        if not checkpoint:
            raise UsageError("--model jaxllm needs --model_args checkpoint=WORKDIR (a `jaxllm train` workdir)")
        if unused:
            logger.warning("jaxllm ignores these model_args: %s", ", ".join(sorted(unused)))
        del max_batch_size, device  # jaxllm places batches on its own mesh

        self.model = EvalModel.load(checkpoint)
        self.tokenizer = self.model.tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # -- identity -----------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"jaxllm-{self.tokenizer.fingerprint}"

    @property
    def max_length(self) -> int:
        return self.model.max_len

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "jaxllm" if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        messages = validate_messages(list(chat_history), "lm-eval chat history")
        return render_text(messages, add_generation_prompt=add_generation_prompt)

    # -- requests -----------------------------------------------------------------------------------
    def _context_ids(self, text: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self._context_ids(context), self.tokenizer.encode(continuation)

    def _score_args(self, disable_tqdm: bool, desc: str) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "mesh": self.model.mesh, "pad_id": self.tokenizer.pad_id,
                "progress": not disable_tqdm, "desc": desc}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        pairs = [self._pair(*request.args) for request in requests]
        model = self.model
        scores = score_continuations(model.config.model, model.graphdef, model.params, pairs,
                                     **self._score_args(disable_tqdm, "loglikelihood"))
        results = []
        for request, logprob, greedy in zip(requests, scores.logprob, scores.greedy):
            result = (float(logprob), bool(greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        documents = [self._context_ids(request.args[0]) for request in requests]
        scored = [number for number, ids in enumerate(documents) if len(ids) > 1]  # "" has nothing to predict
        logprobs = [0.0] * len(documents)
        if scored:
            model = self.model
            scores = score_documents(model.config.model, model.graphdef, model.params,
                                     [documents[n] for n in scored], **self._score_args(disable_tqdm, "rolling"))
            for number, logprob in zip(scored, scores.logprob):
                logprobs[number] = float(logprob)
        for request, logprob in zip(requests, logprobs):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, logprob)
        return logprobs

    def _sampling(self, gen_kwargs: dict[str, Any]):
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 1.0) or 0) > 0
        return SamplingSettings(
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(gen_kwargs.get("top_k", 0) or 0) if sample else 0,
            top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
            stop_ids=(self.tokenizer.eos_id,))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings_of, stops_of, ignored = {}, {}, set()
        for number, request in enumerate(requests):
            gen_kwargs = dict(request.args[1] or {})
            ignored |= set(gen_kwargs) - _SUPPORTED_GEN_KWARGS
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = self._sampling(gen_kwargs)
            key = (settings, tuple(until))
            groups.setdefault(key, []).append(number)
            settings_of[key], stops_of[key] = settings, until
        if ignored:
            logger.warning("jaxllm ignores these generation arguments: %s", ", ".join(sorted(ignored)))
        outputs: list[str] = [""] * len(requests)
        for key, members in groups.items():
            prompts = [self._context_ids(requests[n].args[0]) for n in members]
            answers = generate_completions(self.model, prompts, settings_of[key], batch_size=self.batch_size,
                                           progress=not disable_tqdm, desc="generate_until")
            for number, answer in zip(members, answers):
                text = cut_at_stop(answer["text"], stops_of[key])
                self.cache_hook.add_partial("generate_until", requests[number].args, text)
                outputs[number] = text
        return outputs


if HAVE_LM_EVAL:
    register_model("jaxllm")(JaxLLM)
