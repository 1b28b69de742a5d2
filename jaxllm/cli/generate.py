"""`jaxllm generate` (continuations or chat answers for prompts) and `jaxllm chat` (an interactive chat)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from jaxllm.cli.sampling import add_sampling_arguments, settings_from_args
from jaxllm.completions import complete_prompts, read_prompt_records
from jaxllm.data.chat import prompt_ids
from jaxllm.errors import UsageError
from jaxllm.generate import load_model_for_inference, stream


def generate_command(argv: list[str]) -> int:
    """`jaxllm generate --checkpoint WORKDIR (--prompt TEXT... | --prompts-file F) [--chat] [--out F.jsonl]`."""
    parser = argparse.ArgumentParser(prog="jaxllm generate",
                                     description="Sample continuations (or chat answers) from a trained model.")
    parser.add_argument("--checkpoint", required=True, help="a training workdir (config.yaml + checkpoints/)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help=".jsonl with prompt/messages/text fields, or a text file, one a line")
    parser.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template as a user turn")
    parser.add_argument("--out", help="write one JSON line per prompt here (prompt, completion, tokens, finished, "
                        "logprob) instead of printing; without it several prompts print as prompt<TAB>answer lines")
    parser.add_argument("--batch-size", type=int, default=16)
    add_sampling_arguments(parser, 64)
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        raise UsageError("give --prompt TEXT or --prompts-file FILE")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    records = [{"text": text} for text in args.prompt]
    if args.prompts_file:
        records += read_prompt_records(Path(args.prompts_file))
    model = load_model_for_inference(args.checkpoint)
    settings = settings_from_args(args, model[3])
    started = time.perf_counter()
    results = complete_prompts(model, records, settings, chat=args.chat, batch_size=args.batch_size, seed=args.seed)
    seconds = time.perf_counter() - started
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(result, ensure_ascii=False) + "\n")
        total = sum(r["tokens"] for r in results)
        print(f"wrote {len(results)} completions ({total} tokens, {seconds:.1f}s) to {out}", file=sys.stderr)
    else:
        for line in terminal_lines(results, args.chat):
            print(line)
    return 0


def _one_line(text: str) -> str:
    """Backslash, tab and line breaks escaped, so a field never splits a `prompt<TAB>answer` line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def terminal_lines(results: list[dict], chat: bool) -> list[str]:
    """What `jaxllm generate` prints without --out. One prompt: the continuation after its prompt (or, with
    --chat, the answer) as is. Several: one `prompt<TAB>answer` line each (tabs and newlines escaped as
    \\t and \\n), so every answer stays next to the prompt it answers; --out writes JSONL instead."""
    if len(results) == 1:
        (result,) = results
        return [result["completion"] if chat else result["prompt"] + result["completion"]]
    return [f"{_one_line(r['prompt'])}\t{_one_line(r['completion'])}" for r in results]


def chat_command(argv: list[str]) -> int:
    """`jaxllm chat --checkpoint WORKDIR`: an interactive chat in the terminal, answers streamed as sampled."""
    parser = argparse.ArgumentParser(prog="jaxllm chat", description="Chat with a trained model in the terminal. "
                                     "Commands: /reset clears the conversation, /quit leaves.")
    parser.add_argument("--checkpoint", required=True, help="a training workdir (config.yaml + checkpoints/)")
    parser.add_argument("--system", default="", help="a system message opening the conversation")
    add_sampling_arguments(parser, 128)
    args = parser.parse_args(argv)
    config, graphdef, params, tokenizer = load_model_for_inference(args.checkpoint)

    # The model may open the next user turn instead of ending with EOS: stop there too.
    settings = settings_from_args(args, tokenizer, extra_stop_ids=(tokenizer.user_id,))
    budget = config.model.max_seq_len - settings.max_new_tokens
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"chatting with {args.checkpoint} ({config.model.preset or 'custom'} model). /reset clears, /quit leaves.")
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        ids = prompt_ids(system + history, tokenizer)
        while len(ids) > budget and len(history) > 1:  # forget the oldest exchange
            history = history[2:] if len(history) > 2 else history[-1:]
            ids = prompt_ids(system + history, tokenizer)
        if len(ids) > budget:
            print(f"(that message is {len(ids)} tokens; at most {budget} fit before the answer)")
            history.pop()
            continue
        print("model> ", end="", flush=True)
        answer: list[int] = []
        shown = ""
        for token in stream(config.model, graphdef, params, ids, settings,
                            jax.random.fold_in(jax.random.key(args.seed), turn), pad_id=tokenizer.pad_id):
            if token in settings.stop_ids:
                break
            answer.append(token)
            text_so_far = tokenizer.decode(answer)
            if not text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text_so_far[len(shown):], end="", flush=True)
                shown = text_so_far
        final = tokenizer.decode(answer)
        print(final[len(shown):], flush=True)
        history.append({"role": "assistant", "content": final})
        turn += 1
