"""The README's "Your own data" section: every documented example line is accepted by the data layer, and
the worked example (tokenizer -> pretraining -> SFT -> DPO -> generate -> eval) runs as written on a small
corpus the test writes (micro preset, two steps per stage)."""

import json
import random
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jaxllm.cli import main
from jaxllm.cli.generate import terminal_lines
from jaxllm.config import load_config
from jaxllm.data import Tokenizer
from jaxllm.data.pipeline import load_prompts
from jaxllm.stages import build_rows
from jaxllm.tasks import get_task

README = Path(__file__).resolve().parent.parent / "README.md"
FAST = ["model.preset=micro", "train.steps=2", "train.batch_size=4", "train.eval_batches=1", "train.progress=false",
        "train.log_every=1", "train.checkpoint_every=2", "data.seq_len=64", "mesh.num_devices=1"]


def documented_examples() -> dict[str, list[dict]]:
    """`<!-- format: KIND -->` + a ```json block in the README -> KIND: its JSON lines."""
    blocks = re.findall(r"<!-- format: (\w+) -->\s*```json\n(.*?)```", README.read_text(), re.S)
    return {kind: [json.loads(line) for line in body.splitlines() if line.strip()] for kind, body in blocks}


def documented_commands() -> list[list[str]]:
    """The worked example's commands, as argument lists without the leading `jaxllm`."""
    match = re.search(r"<!-- own-data-example -->\s*```bash\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its <!-- own-data-example --> block"
    commands = [shlex.split(line) for line in match.group(1).splitlines() if line.strip()]
    assert all(c[0] == "jaxllm" for c in commands)
    return [c[1:] for c in commands]


def test_readme_documents_every_stage_and_eval_format():
    assert set(documented_examples()) == {"pretrain", "sft", "dpo", "kto", "rl", "mc", "generate"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "kto", "rl"])
def test_readme_example_lines_are_accepted_by_their_stage(stage, tmp_path):
    lines = documented_examples()[stage]
    path = tmp_path / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = Tokenizer.load("default")
    config = load_config(None, [f"train.stage={stage}", f"data.source=jsonl:{path}", f"data.eval_source=jsonl:{path}",
                                "data.seq_len=64", "model.preset=micro"])
    if stage == "rl":
        prompts = load_prompts(f"jsonl:{path}", tokenizer, seq_len=64)
        assert [p["reference"] for p in prompts] == [line["reference"] for line in lines]
        return
    rows = build_rows(config, tokenizer, "train")
    assert rows.report.examples == {"dpo": 1, "kto": 2}.get(stage, len(lines)), rows.report


@pytest.mark.parametrize("kind", ["mc", "generate"])
def test_readme_eval_lines_parse_into_their_task(kind, tmp_path):
    lines = documented_examples()[kind]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    examples = get_task(f"{kind}:jsonl:{path}").examples()
    assert len(examples) == len(lines)
    if kind == "mc":
        assert examples[0].answer == lines[0]["answer"] and examples[0].choices == lines[0]["choices"]


def _write_corpus(directory: Path) -> None:
    """A made-up language (enough distinct text for a 1,000-piece tokenizer) and files in the documented formats."""
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "." for _ in range(1500)]
    (directory / "my_corpus.txt").write_text("\n\n".join(documents) + "\n")
    chats, pairs = [], []
    for i in range(60):
        question, answer, wrong = f"What is {words[i]}?", f"{words[i + 100]} {words[i + 200]}.", f"{words[i + 300]}."
        chats.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                     if i % 2 else {"prompt": question, "response": answer})
        pairs.append({"prompt": question, "chosen": answer, "rejected": wrong})
    quiz = [{"question": f"{words[i]} is", "choices": [f" {words[i + 100]}", f" {words[i + 300]}"], "answer": 0}
            for i in range(6)]
    for name, records in (("my_chats", chats), ("my_pairs", pairs), ("my_quiz", quiz)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_readme_worked_example_runs_from_raw_text_to_an_evaluated_chat_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_corpus(tmp_path)
    commands = documented_commands()
    assert [c[0] for c in commands] == ["tokenizer", "train", "train", "train", "generate", "eval"]
    for command in commands:
        extra = FAST if command[0] == "train" else ["--max-new-tokens", "4"] if command[0] == "generate" else []
        capsys.readouterr()
        assert main(command + extra) == 0, f"`jaxllm {shlex.join(command)}` failed:\n{capsys.readouterr()}"
        output = capsys.readouterr().out
        if command[0] == "train" and command[1] == "pretrain_tiny":
            assert "model.vocab_size=1024: from the tokenizer my_tokenizer (1000 ids" in output
        if command[0] == "generate":
            prompts = [command[i + 1] for i, arg in enumerate(command) if arg == "--prompt"]
            assert [line.split("\t")[0] for line in output.splitlines()] == prompts
    saved = yaml.safe_load((tmp_path / "runs" / "my_dpo" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 1024 and saved["data"]["tokenizer"] == "my_tokenizer"
    quiz = json.loads((tmp_path / "runs" / "my_dpo" / "quiz.json").read_text())
    assert "my_quiz" in json.dumps(quiz)


def test_several_prompts_print_one_escaped_prompt_tab_answer_line_each():
    results = [{"prompt": "a\tb", "completion": "line one\nline two"}, {"prompt": "c\\d", "completion": "e"}]
    assert terminal_lines(results, chat=True) == ["a\\tb\tline one\\nline two", "c\\\\d\te"]
    single = [{"prompt": "Once upon", "completion": " a time"}]
    assert terminal_lines(single, chat=False) == ["Once upon a time"]
    assert terminal_lines(single, chat=True) == [" a time"]
