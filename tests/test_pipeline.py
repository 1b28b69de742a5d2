"""`jaxllm pipeline` on a micro recipe: every stage from the previous one's checkpoint, a parseable
report, resumption, and SFT raising the EOS rate and QA accuracy above the pretrained model's."""

import json
import re
from pathlib import Path

import pytest

from jaxllm import checkpoint as ckpt
from jaxllm import evaluate
from jaxllm.config import ConfigError
from jaxllm.pipeline import load_recipe, run_pipeline

MICRO_TEMPLATE = """
tokenizer: {train: true, vocab_size: 512, model_type: bpe, input: default:pretrain}
common: [model.preset=micro, mesh.num_devices=1, train.batch_size=16, train.eval_batches=1, train.log_every=10,
         train.progress=false, data.seq_len=96, model.max_seq_len=128]
stages:
  - {name: pretrain, recipe: configs/pretrain_tiny.yaml,
     overrides: [train.steps=30, train.checkpoint_every=15, train.eval_every=0, optimizer.learning_rate=1e-2]}
  - {name: sft, recipe: configs/sft_tiny.yaml,
     overrides: [train.steps=50, train.eval_every=0, optimizer.learning_rate=1e-2, "data.source=jsonl:SFT_FILE",
                 "data.eval_source=jsonl:SFT_FILE"]}
  - {name: dpo, recipe: configs/dpo_tiny.yaml, overrides: [train.steps=4, train.eval_every=0]}
evaluation: {qa_source: "jsonl:SFT_FILE", qa_examples: 16, trained_qa_examples: 0, text_batches: 1,
             preference_pairs: 16, max_new_tokens: 12, probe_people: 2, prompts: ["Where was Lucia Wagner born?"]}
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    # SFT on 16 conversations (memorisable in seconds); the QA eval asks those questions.
    sft_file = workdir / "sft16.jsonl"
    lines = [line for line in evaluate.read_records("default:sft", 16)]
    sft_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = workdir / "micro.yaml"
    recipe.write_text(MICRO_TEMPLATE.replace("SFT_FILE", str(sft_file)))
    logs: list[str] = []
    report = run_pipeline(recipe, workdir / "run", log=logs.append, progress=False)
    return recipe, workdir / "run", report, logs


def test_every_stage_starts_from_the_previous_checkpoint(pipeline_run):
    _, workdir, report, _ = pipeline_run
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["pretrain", "sft", "dpo"]
    assert stages[0]["init_from"] == ""
    assert stages[1]["init_from"] == str(workdir / "pretrain")
    assert stages[2]["init_from"] == str(workdir / "sft")
    for stage in stages:
        assert ckpt.latest_step(stage["workdir"]) == stage["steps"]


def test_report_files_exist_and_parse(pipeline_run):
    _, workdir, _, _ = pipeline_run
    report = json.loads((workdir / "report.json").read_text())
    assert report["stages"][1]["evaluation"]["qa_heldout"]["examples"] == 16
    markdown = (workdir / "report.md").read_text()
    assert "| sft | sft |" in markdown and "losses.png" in markdown
    for png in ("losses.png", "eval.png"):
        assert (workdir / png).read_bytes()[:4] == b"\x89PNG"
    for stage in report["stages"]:
        assert 0.0 <= stage["evaluation"]["completion_probe"] <= 1.0
        assert stage["summary"]["compile_seconds"] >= 0 and stage["train_seconds"] > 0
        # every stage traced and lowered new programs (train step, eval step, generation) in this run
        assert stage["compile_seconds"]["train"] > 0 and stage["compile_seconds"]["evaluation"] > 0
    assert "completion probe" in markdown and "compile s" in markdown
    assert re.search(r"Compiling took \d+ s of the \d+ s wall time \(\d+\.\d%\)", markdown)
    assert "## What each stage shows" in markdown and "*Lecture*: SFT teaches the format" in markdown


def test_story_line_puts_each_measured_change_beside_the_lecture_claim():
    from jaxllm.report import story_line

    def stage(kind, probe, held_out, trained, eos, preference):
        return {"name": kind, "stage": kind, "evaluation": {
            "completion_probe": probe, "qa_heldout": {"exact_match": held_out, "eos_rate": eos},
            "qa_trained": {"exact_match": trained}, "preferences": {"preference_accuracy": preference}}}

    pretrain, sft = stage("pretrain", 0.9, 0.0, 0.0, 0.4, 0.6), stage("sft", 0.88, 0.3, 0.95, 1.0, 0.7)
    line = story_line(sft, pretrain)
    assert line.startswith("- **sft**: probe 90.0% → 88.0%, held-out QA 0.0% → 30.0%, trained QA 0.0% → 95.0%")
    assert "EOS 40.0% → 100.0%" in line and "*Lecture*: SFT teaches the format" in line
    assert story_line(pretrain, None).startswith("- **pretrain**: probe 90.0%, held-out QA 0.0%")


def test_sft_raises_eos_rate_and_qa_accuracy_above_the_pretrained_model(pipeline_run):
    # Micro scale: the QA set is the SFT questions (held-out people need minutes of training: see the
    # default pipeline's report in the README for the held-out numbers).
    _, _, report, _ = pipeline_run
    pretrained, sft = (report["stages"][i]["evaluation"]["qa_heldout"] for i in (0, 1))
    assert sft["eos_rate"] > pretrained["eos_rate"]
    assert sft["exact_match"] > pretrained["exact_match"]


def test_rerunning_skips_finished_stages(pipeline_run):
    recipe, workdir, _, _ = pipeline_run
    logs: list[str] = []
    rerun = run_pipeline(recipe, workdir, log=logs.append, progress=False)
    assert sum("already finished" in line for line in logs) == 3
    # nothing was trained or evaluated again, so nothing was compiled
    assert all(stage["compile_seconds"] == {"train": None, "evaluation": 0.0} for stage in rerun["stages"])


def test_bad_pipeline_recipe_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: a, recipe: configs/pretrain_tiny.yaml, overides: []}\n")
    with pytest.raises(ConfigError, match="unknown key.*overides"):
        load_recipe(bad)
    (tmp_path / "empty.yaml").write_text("common: []\n")
    with pytest.raises(ConfigError, match="needs a 'stages' list"):
        load_recipe(tmp_path / "empty.yaml")


_ = Path


@pytest.mark.parametrize("recipe", ["pipeline_tiny.yaml", "pipeline_kto_tiny.yaml", "pipeline_grpo_tiny.yaml"])
def test_shipped_pipeline_recipes_load_and_chain_their_stages(recipe, tmp_path):
    loaded = load_recipe(Path(__file__).resolve().parent.parent / "configs" / recipe)
    assert [s.name for s in loaded.stages][:2] == ["pretrain", "sft"]
    from jaxllm.pipeline import stage_configs

    configs = stage_configs(loaded, tmp_path, "default")
    assert configs[2][1].train.init_from == str(tmp_path / "sft")
    assert configs[2][1].train.stage in ("dpo", "kto", "rl")


# ----------------------------------------------------------------------------------------------
# Fingerprints, damaged state files and the lock (#20.3, #20.5, #20.6)

FINGERPRINT_TEMPLATE = """
tokenizer: {train: false}
common: [model.preset=micro, mesh.num_devices=1, train.batch_size=4, train.eval_batches=1, train.progress=false,
         train.tensorboard=false, data.seq_len=96, optimizer.warmup_steps=0]
stages:
  - {name: pretrain, recipe: configs/pretrain_tiny.yaml, overrides: [train.steps=PRETRAIN_STEPS]}
  - {name: sft, recipe: configs/sft_tiny.yaml, overrides: [train.steps=2]}
evaluation: {qa_examples: 2, trained_qa_examples: 0, text_batches: 1, preference_source: "", max_new_tokens: 2}
"""


def _micro_pipeline(tmp_path, pretrain_steps: int) -> Path:
    recipe = tmp_path / f"fingerprint{pretrain_steps}.yaml"
    recipe.write_text(FINGERPRINT_TEMPLATE.replace("PRETRAIN_STEPS", str(pretrain_steps)))
    return recipe


def test_a_changed_stage_reruns_with_every_later_stage_and_damaged_state_files_are_recomputed(tmp_path):
    workdir = tmp_path / "run"
    first = run_pipeline(_micro_pipeline(tmp_path, 2), workdir, log=lambda *_: None, progress=False)
    assert [s["steps"] for s in first["stages"]] == [2, 2]

    # A kill during a write used to leave empty files: they are recomputed, the finished sft is reused.
    (workdir / "pretrain" / "eval.json").write_text("")
    (workdir / "pretrain" / "summary.json").write_text('{"stage": "pre')
    logs: list[str] = []
    again = run_pipeline(_micro_pipeline(tmp_path, 2), workdir, log=logs.append, progress=False)
    assert any("[2/2 sft] already finished" in line for line in logs), logs
    assert json.loads((workdir / "pretrain" / "summary.json").read_text())["steps"] == 2
    assert again["stages"][0]["evaluation"]["text"] == first["stages"][0]["evaluation"]["text"]

    # More pretraining steps: pretraining and the SFT started from it run again, and say so.
    logs = []
    changed = run_pipeline(_micro_pipeline(tmp_path, 3), workdir, log=logs.append, progress=False)
    reran = [line for line in logs if "changed since it ran: running it again" in line]
    assert [line.split("]")[0] for line in reran] == ["[1/2 pretrain", "[2/2 sft"], logs
    assert not any("already finished" in line for line in logs), logs
    assert ckpt.latest_step(workdir / "pretrain") == 3 and changed["stages"][0]["summary"]["steps"] == 3
    assert ckpt.latest_step(workdir / "pretrain.stale") == 2
    assert changed["stages"][1]["evaluation"] != first["stages"][1]["evaluation"]


def test_a_second_pipeline_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys

    from jaxllm.files import WorkdirBusy

    root = Path(__file__).resolve().parent.parent
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxllm.files import WorkdirLock; "
         "lock = WorkdirLock(sys.argv[1], 'jaxllm pipeline').acquire(); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=rf"in use by another jaxllm pipeline \(pid {holder.pid} on host"):
            run_pipeline(_micro_pipeline(tmp_path, 2), tmp_path / "run", log=lambda *_: None, progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".jaxllm.lock"]
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_compile_clock_counts_new_programs_only():
    import jax
    import jax.numpy as jnp

    from jaxllm.compile_time import CompileClock

    program = jax.jit(lambda x: jnp.tanh(x) * 3.0 + x.sum())  # a fresh function: never compiled before
    with CompileClock() as first:
        program(jnp.ones((5, 7))).block_until_ready()
    with CompileClock() as again:
        program(jnp.ones((5, 7))).block_until_ready()
    assert first.programs >= 1 and first.phases["trace"] > 0 and first.phases["lower"] > 0
    assert first.seconds == pytest.approx(sum(first.phases.values()))
    assert again.programs == 0 and again.seconds == 0.0


OWN_PAIRS_TEMPLATE = """
tokenizer: {train: false}
common: [model.preset=micro, mesh.num_devices=1, train.batch_size=4, train.eval_batches=1, train.progress=false,
         train.tensorboard=false, data.seq_len=96, optimizer.warmup_steps=0, train.eval_every=0]
stages:
  - {name: pretrain, recipe: configs/pretrain_tiny.yaml, overrides: [train.steps=2]}
  - {name: sft, recipe: configs/sft_tiny.yaml, overrides: [train.steps=2]}
  - name: dpo
    recipe: configs/dpo_tiny.yaml
    overrides: [train.steps=2]
    own_answers: {prompts: default:rl_prompts, questions: 3, samples: 2, max_new_tokens: 3, keep_unfinished: true,
                mix: [default:preferences]}
evaluation: {qa_examples: 3, trained_qa_examples: 0, text_batches: 1, preference_source: "", max_new_tokens: 3,
             probe_people: 1, own_mistakes_after: sft}
"""


def test_own_pairs_train_the_feedback_stage_and_the_own_mistakes_set_scores_later_stages(tmp_path):
    recipe, workdir = tmp_path / "own.yaml", tmp_path / "run"
    recipe.write_text(OWN_PAIRS_TEMPLATE)
    logs: list[str] = []
    report = run_pipeline(recipe, workdir, log=logs.append, progress=False)
    own = [json.loads(line) for line in (workdir / "dpo.pairs" / "own.jsonl").read_text().splitlines()]
    questions = {r["prompt"]: r["reference"] for r in evaluate.read_records("default:rl_prompts", 3)}
    # a 2-step model is wrong everywhere: up to two distinct wrong answers (greedy + 1 sample) per question
    assert own and all(p["prompt"] in questions and p["chosen"] == questions[p["prompt"]] for p in own)
    assert len(own) <= 6
    mixed = (workdir / "dpo.pairs" / "mix-0.jsonl").read_text().splitlines()
    assert len(mixed) == len(evaluate.read_records("default:preferences"))
    assert report["stages"][2]["summary"]["config"]["data"]["source"] == f"jsonl:{workdir / 'dpo.pairs'}"
    assert any("[3/3 dpo] own pairs:" in line for line in logs)
    held_out = (workdir / "own_mistakes_eval.jsonl").read_text().splitlines()
    assert 1 <= len(held_out) <= 3
    assert "own_mistakes" not in report["stages"][0]["evaluation"]
    for stage in report["stages"][1:]:
        assert stage["evaluation"]["own_mistakes"]["pairs"] == len(held_out)
    markdown = (workdir / "report.md").read_text()
    assert "own-mistakes acc." in markdown
    assert f"*Data*: {len(own)} wrong answers of the starting model itself to 3 questions of default:rl_prompts" in markdown
    assert report["stages"][2]["own_answers"]["mix"] == ["default:preferences"]

    logs = []
    again = run_pipeline(recipe, workdir, log=logs.append, progress=False)
    assert sum("already finished" in line for line in logs) == 3 and not any("own pairs:" in l for l in logs)
    assert again["stages"][2]["evaluation"] == report["stages"][2]["evaluation"]


def test_own_pairs_need_a_starting_model_and_own_mistakes_a_known_stage(tmp_path):
    from jaxllm.pipeline import stage_configs

    bad = tmp_path / "bad.yaml"
    bad.write_text(OWN_PAIRS_TEMPLATE.replace("own_mistakes_after: sft", "own_mistakes_after: sfft"))
    with pytest.raises(ConfigError, match="own_mistakes_after='sfft' names no stage; the stages are pretrain"):
        load_recipe(bad)
    first = tmp_path / "first.yaml"
    first.write_text("stages:\n  - {name: dpo, recipe: configs/dpo_tiny.yaml, own_answers: {samples: 2}}\n")
    with pytest.raises(ConfigError, match="own_answers are the answers of the model the stage starts from"):
        stage_configs(load_recipe(first), tmp_path, "default")


def test_own_pairs_about_held_out_questions_are_refused(tmp_path):
    recipe = tmp_path / "leak.yaml"
    recipe.write_text(OWN_PAIRS_TEMPLATE.replace("prompts: default:rl_prompts", "prompts: default:qa_eval"))
    with pytest.raises(ConfigError, match="3 of own_answers.prompts=default:qa_eval are held-out questions of "
                                          "evaluation.qa_source=default:qa_eval"):
        load_recipe(recipe)


def test_a_stage_without_mistakes_leaves_the_own_mistakes_column_empty(tmp_path, monkeypatch):
    import jaxllm.pipeline as pipeline

    calls = []

    def no_mistakes(model, questions, settings):
        calls.append(len(questions))
        return [], {"questions": len(questions), "greedy_correct": 1.0, "any_correct": 1.0, "pairs": 0,
                    "questions_with_pairs": 0}

    monkeypatch.setattr(pipeline.EvalModel, "load", classmethod(lambda cls, path: None))
    monkeypatch.setattr(pipeline, "own_mistake_pairs", no_mistakes)
    spec, logs = pipeline.EvaluationSpec(qa_examples=4, own_mistakes_after="sft"), []
    assert pipeline.prepare_own_mistakes(tmp_path / "sft", spec, tmp_path, "fp", logs.append, "[2/3 sft]") == 0
    assert calls == [4] and (tmp_path / "own_mistakes_eval.jsonl").read_text() == ""
    assert "(none: the own-mistakes column stays empty)" in logs[0]
    # reused for the same stage fingerprint, remade for another
    assert pipeline.prepare_own_mistakes(tmp_path / "sft", spec, tmp_path, "fp", logs.append, "[2/3 sft]") == 0
    assert calls == [4]
    pipeline.prepare_own_mistakes(tmp_path / "sft", spec, tmp_path, "other", logs.append, "[2/3 sft]")
    assert calls == [4, 4]
