"""Evaluation: log-likelihood scoring against a direct forward pass, padding and sharding that change
nothing, a trained preference ranked first, bits per byte of a uniform model, generative metrics, the
pairwise judge, `jaxllm eval` end to end on a trained workdir, and the lm-evaluation-harness adapter."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import evaluate as ev
from jaxllm.evaluate import runner, scoring
from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import steps as steps_lib
from jaxllm.cli import main
from jaxllm.config import MeshConfig, load_config
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.tasks import Task, get_task, metrics, with_overrides

from helpers import assert_greedy_choices_are_decided, tiny_config

CONFIG = tiny_config("model.init_std=0.5")  # vocab 64, max_seq_len 64
RNG = np.random.default_rng(0)
# Rows of 18 and 31 tokens (one width bucket, 32), split differently into context and continuation.
REQUESTS = [(list(RNG.integers(4, 64, split)), list(RNG.integers(4, 64, total - split)))
            for total in (18, 31) for split in (1, 5, 17)]


@pytest.fixture(scope="module")
def tiny_model():
    graphdef, _ = model_lib.abstract_model(CONFIG.model)
    return graphdef, jax.jit(lambda: model_lib.init_model(CONFIG.model, 0)[1])()


_forward = jax.jit(model_lib.apply, static_argnums=0)


def _direct_logprob(graphdef, params, context, continuation):
    """One unpadded row through the model."""
    ids = np.asarray([list(context) + list(continuation)], np.int32)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    logits = _forward(graphdef, params, ids, positions, np.ones_like(ids))
    return float(losses.token_logprobs(logits, ids)[0, len(context):].sum()), logits


def test_loglikelihood_equals_the_sum_of_token_logprobs_of_a_direct_forward_pass(tiny_model):
    graphdef, params = tiny_model
    scores = scoring.score_continuations(CONFIG.model, graphdef, params, REQUESTS, batch_size=4)
    best_next = []
    for (context, continuation), logprob, greedy, count in zip(REQUESTS, scores.logprob, scores.greedy, scores.tokens):
        expected, logits = _direct_logprob(graphdef, params, context, continuation)
        assert logprob == pytest.approx(expected, abs=2e-4)
        assert count == len(continuation)
        argmax = np.asarray(jnp.argmax(logits[0, len(context) - 1:-1], axis=-1))
        assert_greedy_choices_are_decided(logits[0, len(context) - 1:-1])  # so the two programs' argmax agree
        assert greedy == bool((argmax == np.asarray(continuation)).all())
        best_next.append((context + continuation[:1], [int(argmax[1])] if len(continuation) > 1 else [0]))
    # The model's own greedy choice is recognised as greedy.
    greedy = scoring.score_continuations(CONFIG.model, graphdef, params, best_next, batch_size=4).greedy
    assert all(greedy[i] for i, (_, c) in enumerate(REQUESTS) if len(c) > 1)


def test_batched_and_sharded_scores_equal_one_at_a_time_scores_so_padding_does_not_leak(tiny_model):
    graphdef, params = tiny_model
    one_by_one = np.asarray([scoring.score_continuations(CONFIG.model, graphdef, params, [r], batch_size=1).logprob[0]
                             for r in REQUESTS])
    batched = scoring.score_continuations(CONFIG.model, graphdef, params, REQUESTS, batch_size=5, pad_id=7).logprob
    # Sums of up to 30 token log-probs of order 1-10, each from another batch shape / mesh: float32
    # reordering (a few ulps per term); 2e-4 absolute is ~100x that.
    np.testing.assert_allclose(batched, one_by_one, atol=2e-4)
    mesh = sharding_lib.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2, num_devices=4))
    shardings = sharding_lib.tree_shardings(params, model_lib.logical_axes(CONFIG.model), mesh)
    sharded_params = jax.device_put(params, shardings)
    sharded = scoring.score_continuations(CONFIG.model, graphdef, sharded_params, REQUESTS, batch_size=3)
    np.testing.assert_allclose(sharded.logprob, one_by_one, atol=2e-4)


def test_rolling_windows_predict_every_token_once_within_the_context_limit():
    ids = list(range(100, 237))
    for max_len in (8, 16, 64, 200):
        windows = scoring.rolling_requests(ids, max_len)
        assert sum((continuation for _, continuation in windows), []) == ids[1:]
        for context, continuation in windows:
            assert context and len(context) + len(continuation) <= max_len
            assert ids[ids.index(continuation[0]) - len(context):ids.index(continuation[0])] == context
        assert all(len(c) + len(t) == max_len for c, t in windows[1:-1])  # full context after the first window


def test_a_model_trained_to_prefer_an_answer_scores_it_first(tiny_model):
    graphdef, params = tiny_model
    context, choices = [2, 10, 11, 12, 13], [[20, 21], [30], [40, 41, 42], [50, 51]]
    requests = [(context, choice) for choice in choices]
    before = scoring.score_continuations(CONFIG.model, graphdef, params, requests).logprob
    target = int(np.argmin(before))  # the answer the untrained model likes least
    ids = np.asarray([context + choices[target]], np.int32)
    mask = np.zeros_like(ids, dtype=np.float32)
    mask[0, len(context):] = 1.0
    row = (ids, np.arange(ids.shape[1], dtype=np.int32)[None], np.ones_like(ids), mask)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: -steps_lib.sequence_logprobs(graphdef, p, *row).sum()  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for _ in range(15):
        params, opt_state = step(params, opt_state)
    after = scoring.score_continuations(CONFIG.model, graphdef, params, requests).logprob
    assert int(np.argmax(after)) == target and after[target] > before[target]


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_per_byte(tmp_path):
    config = load_config(None, ["model.preset=micro"])  # vocab 512, max_seq_len 128
    graphdef, abstract = model_lib.abstract_model(config.model)
    uniform = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)  # zero output head: equal logits
    tokenizer = Tokenizer.load("default")
    texts = ["Ana Lopez was born in Lisbon. " * 30, "Déjà vu: 日本語 text, ünïcode.", "x"]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    task = Task(name="uniform", kind="perplexity", source=f"jsonl:{path}", fields={"text": "body"})
    result = runner.run_task(scoring.EvalModel(config, graphdef, uniform, tokenizer), task, runner.RunSettings(batch_size=2))
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)  # every text token and EOS is predicted
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert tokens > 2 * config.model.max_seq_len  # the long text is scored in several windows
    assert result.metrics["tokens"] == tokens and result.metrics["bytes"] == text_bytes
    assert result.metrics["bits_per_byte"] == pytest.approx(math.log2(512) * tokens / text_bytes, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(512, rel=1e-4)


def test_generative_metrics_exact_match_contains_and_gsm8k_regex():
    assert metrics.exact_match("  Lisbon. ", ["lisbon"]) and not metrics.exact_match("Lisbon, Portugal", ["Lisbon"])
    assert metrics.contains("She was born in Lisbon.", ["lisbon"]) and not metrics.contains("Oslo", ["Lisbon"])
    pattern = get_task("generate:x.jsonl").answer_regex
    assert metrics.regex_match("3 + 4 = 7\n#### 7", ["He has #### 7"], pattern) == (True, "7")
    assert metrics.regex_match("#### 1,000", ["1000"], pattern)[0]
    assert metrics.regex_match("#### 12 then #### 13", ["13"], pattern) == (True, "13")  # the last match
    assert metrics.regex_match("the answer is 7", ["7"], pattern) == (False, None)
    assert metrics.cut_at_stop("Lisbon\nQuestion: next", ["\n", "Question"]) == "Lisbon"
    assert metrics.win_rate([1.0, 0.5, 0.0, 1.0])["win_rate"] == pytest.approx(0.625)


def test_few_shot_prompts_are_solved_examples_then_the_question(tmp_path):
    tokenizer = Tokenizer.load("default")
    path = tmp_path / "mc.jsonl"
    rows = [{"q": f"Q{i}?", "options": [f"a{i}", f"b{i}"], "label": "B"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Task(name="few", kind="mc", source=str(path), num_fewshot=2, template="Question: {question}\nAnswer:",
                fields={"question": "q", "choices": "options", "answer": "label"})
    examples = task.examples()
    shots = task.fewshot(examples[0], task.fewshot_pool(examples))
    assert len(shots) == 2 and examples[0].where not in [s.where for s in shots]
    assert shots == task.fewshot(examples[0], task.fewshot_pool(examples))  # the same shots every run
    text = tokenizer.decode(runner.prompt_ids(task, examples[0], shots, tokenizer))
    expected = "".join(f"Question: {s.question}\nAnswer: {s.choices[1]}\n\n" for s in shots) + "Question: Q0?\nAnswer:"
    assert text == expected
    chat = runner.prompt_ids(Task(name="c", kind="mc", source=str(path), chat=True, fields=task.fields), examples[0], shots,
                         tokenizer)
    assert chat[-1] == tokenizer.assistant_id and chat.count(tokenizer.assistant_id) == 3


# ----------------------------------------------------------------------------------------------
# On a trained workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxllm.train import train

    path = tmp_path_factory.mktemp("evaluate") / "run"
    config = load_config(None, [
        "model.preset=micro", "mesh.num_devices=1", "data.source=default:pretrain", "train.steps=3",
        "train.batch_size=4", "data.seq_len=64", "train.eval_every=0", "train.checkpoint_every=3",
        "train.progress=false", "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2"])
    train(config, path, log=lambda line: None)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_cli_end_to_end_writes_a_summary_and_per_example_outputs(workdir, tmp_path, capsys):
    mc = _write_jsonl(tmp_path / "capitals.jsonl", [
        {"query": f"The capital of country {i} is", "options": ["Lisbon", "Oslo", "Lima"], "gold": i % 3}
        for i in range(6)])
    math_file = _write_jsonl(tmp_path / "math.jsonl", [{"question": f"{i} + {i} =", "answer": f"... #### {2 * i}"}
                                                       for i in range(3)])
    out = tmp_path / "results" / "results.json"
    argv = ["eval", "--checkpoint", str(workdir), "--task", "heldout_text", "--task", "bio_mc", "--task", "bio_qa",
            "--task", f"jsonl_mc:{mc}", "--field", "question=query", "--field", "choices=options",
            "--field", "answer=gold", "--num-fewshot", "1", "--limit", "4", "--batch-size", "8", "--no-progress",
            "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("heldout_text", "bio_mc", "bio_qa", "mc_capitals", "bits_per_byte=", "acc=", "exact_match="):
        assert name in table
    summary = json.loads(out.read_text())
    assert summary["step"] == 3 and set(summary["tasks"]) == {"heldout_text", "bio_mc", "bio_qa", "mc_capitals"}
    for name, task in summary["tasks"].items():
        samples = [json.loads(line) for line in open(task["samples"])]
        assert task["examples"] == len(samples) == 4, name
        if task["kind"] == "multiple_choice":
            assert task["metrics"]["acc"] == pytest.approx(np.mean([s["correct"] for s in samples]))
            assert all(s["prediction"] == int(np.argmax(s["logprobs"])) for s in samples)
    text = summary["tasks"]["heldout_text"]["metrics"]
    samples = [json.loads(line) for line in open(summary["tasks"]["heldout_text"]["samples"])]
    assert text["bits_per_byte"] == pytest.approx(sum(s["nats"] for s in samples) / math.log(2) / text["bytes"])
    # A generative task with the GSM8K-style regex, sampled decoding and a stop string.
    assert main(["eval", "--checkpoint", str(workdir), "--task", f"generate:{math_file}", "--metric", "regex",
                 "--stop", "\n", "--max-new-tokens", "6", "--temperature", "0.7", "--no-progress"]) == 0
    assert "generate_math" in capsys.readouterr().out


def test_pipeline_functions_agree_with_the_tasks(workdir):
    from jaxllm.generate import load_model_for_inference

    config, graphdef, params, tokenizer = load_model_for_inference(workdir)
    text = ev.perplexity(config, graphdef, params, tokenizer, "default:pretrain_eval", num_batches=1, batch_size=8)
    task = runner.run_task(scoring.EvalModel(config, graphdef, params, tokenizer), get_task("heldout_text"),
                       runner.RunSettings(batch_size=8), limit=8)
    assert text["bits_per_byte"] == pytest.approx(task.metrics["bits_per_byte"])
    assert text["tokens"] == task.metrics["tokens"] > 8 * 20
    records = ev.read_records("default:qa_eval", 4)
    qa = ev.qa_accuracy(config, graphdef, params, tokenizer, records, 6)
    bio_qa = runner.run_task(scoring.EvalModel(config, graphdef, params, tokenizer),
                         with_overrides(get_task("bio_qa"), max_new_tokens=6), limit=4)
    assert qa["examples"] == 4 and 0 <= qa["eos_rate"] <= 1
    assert [s["question"] for s in bio_qa.samples] == [r["prompt"] for r in records]


def test_preference_accuracy_pads_a_short_last_batch_without_counting_the_padding(workdir, tmp_path):
    """7 pairs in batches of 3: the last batch is one pair repeated to 3 rows, and only that pair counts, so the
    accuracy and the mean margin equal pair-by-pair scoring's (batches of 1); max_pairs cuts the pairs scored."""
    from jaxllm.generate import load_model_for_inference

    config, graphdef, params, tokenizer = load_model_for_inference(workdir)
    records = ev.read_records("default:preferences_eval", 7)
    # Every other pair swapped: margins of both signs, so a counted pad row would move the accuracy.
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 2 else r for i, r in enumerate(records)])
    batched = ev.preference_accuracy(config, graphdef, params, tokenizer, f"jsonl:{pairs}", batch_size=3)
    one_by_one = ev.preference_accuracy(config, graphdef, params, tokenizer, f"jsonl:{pairs}", batch_size=1)
    assert batched["pairs"] == one_by_one["pairs"] == 7
    assert batched["preference_accuracy"] == one_by_one["preference_accuracy"]
    assert batched["logprob_margin"] == pytest.approx(one_by_one["logprob_margin"], abs=1e-4)
    truncated = ev.preference_accuracy(config, graphdef, params, tokenizer, f"jsonl:{pairs}", max_pairs=4,
                                       batch_size=3)
    assert truncated["pairs"] == 4


def test_pairwise_win_rate_against_itself_is_one_half_whatever_the_judges_position_bias(workdir):
    model = scoring.EvalModel.load(workdir)
    task = Task(name="self", kind="pairwise", source="default:qa_eval", fields={"question": "prompt"}, chat=True,
                max_new_tokens=6)
    result = runner.run_task(model, task, runner.RunSettings(baseline=model, judge=model), limit=4)
    # Identical answers: the judge sees the same prompt in both orders, so whichever letter it prefers,
    # the model wins once and loses once on every prompt.
    assert result.metrics["win_rate"] == 0.5 and result.metrics["ties"] == 4
    assert all(s["answer"] == s["baseline"] for s in result.samples)
    assert result.metrics["judge_picks_first"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    # With the records' own answers as the baseline instead of a second model:
    task = Task(name="refs", kind="pairwise", source="default:qa_eval", chat=True, max_new_tokens=6,
                fields={"question": "prompt", "baseline": "reference"})
    result = runner.run_task(model, task, limit=4)
    assert [s["baseline"] for s in result.samples] == [r["reference"] for r in ev.read_records("default:qa_eval", 4)]
    assert result.metrics["wins"] + result.metrics["ties"] + result.metrics["losses"] == 4


def test_bad_task_input_is_a_usage_error_naming_the_file_and_field(workdir, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0},
                                                {"question": "Q2?", "options": ["a", "b"], "answer": 1}])
    assert main(["eval", "--checkpoint", str(workdir), "--task", f"mc:{bad}", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{bad}:2" in error and "'choices'" in error
    assert main(["eval", "--checkpoint", str(workdir), "--task", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(workdir), "--task", "bio_mc", "--field", "bogus=x"]) == 2
    assert "'bogus' is not a task field" in capsys.readouterr().err
    yaml_task = tmp_path / "task.yaml"
    yaml_task.write_text("kind: multiple_choice\nsource: bad.jsonl\nchoise: [a]\n")
    assert main(["eval", "--checkpoint", str(workdir), "--task", str(yaml_task)]) == 2
    assert "unknown key(s) choise" in capsys.readouterr().err


def test_tfds_and_yaml_tasks_with_a_field_mapping_score_like_the_same_jsonl(workdir, tmp_path, monkeypatch):
    from jaxllm.data import build_tfds_from_jsonl

    monkeypatch.setenv("NO_GCE_CHECK", "true")
    rows = [{"question": f"Where does person {i} live?", "opa": "Lisbon", "opb": "Oslo", "opc": "Lima",
             "cop": i % 3} for i in range(5)]
    source = _write_jsonl(tmp_path / "medmcqa_like.jsonl", rows)
    dataset = build_tfds_from_jsonl(source, tmp_path / "tfds", name="medmcqa_like")
    yaml_task = tmp_path / "medmcqa.yaml"
    yaml_task.write_text("kind: multiple_choice\nsource: medmcqa_like.jsonl\ntemplate: \"Q: {question}\\nA:\"\n"
                         "fields: {choices: 'opa,opb,opc', answer: cop}\n")
    model = scoring.EvalModel.load(workdir)
    settings = runner.RunSettings(batch_size=8)
    from_yaml = runner.run_task(model, get_task(str(yaml_task)), settings)
    tfds_task = Task(name="t", kind="mc", source=f"tfds:{dataset}:train", template="Q: {question}\nA:",
                     fields={"choices": "opa,opb,opc", "answer": "cop"})
    from_tfds = runner.run_task(model, tfds_task, settings)
    assert [s["choices"] for s in from_tfds.samples] == [["Lisbon", "Oslo", "Lima"]] * 5
    assert [s["answer"] for s in from_tfds.samples] == [r["cop"] for r in rows]
    np.testing.assert_allclose([s["logprobs"] for s in from_tfds.samples], [s["logprobs"] for s in from_yaml.samples],
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra)


def test_lm_eval_adapter_matches_jaxllm_scoring_on_a_local_task(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from jaxllm import lm_eval_adapter

    rows = [{"question": f"Where was person {i} born?", "choices": ["Lisbon", "Oslo", "Kyoto"], "answer": i % 3}
            for i in range(6)]
    data = _write_jsonl(tmp_path / "local.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        "task: jaxllm_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    assert get_model("jaxllm") is lm_eval_adapter.JaxLLM  # what `--model jaxllm` finds
    lm = lm_eval_adapter.JaxLLM(checkpoint=str(workdir), batch_size="8")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["jaxllm_local_mc"], task_manager=tasks)
    harness_acc = results["results"]["jaxllm_local_mc"]["acc,none"]
    model, tokenizer = lm.model, lm.tokenizer
    ours = runner.run_task(model, Task(name="local", kind="mc", source=str(data)), runner.RunSettings(batch_size=8))
    assert harness_acc == pytest.approx(ours.metrics["acc"])

    def instance(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    question = rows[0]["question"]
    [(logprob, _)] = lm.loglikelihood([instance("loglikelihood", (question, " Lisbon"))])
    expected = ours.samples[0]["logprobs"][0]
    assert logprob == pytest.approx(expected, abs=1e-4)
    text = "Ana Lopez was born in Lisbon. " * 20
    rolling = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    direct = scoring.score_documents(model.config.model, model.graphdef, model.params,
                                [[tokenizer.bos_id, *tokenizer.encode(text)]]).logprob[0]
    assert rolling[0] == pytest.approx(direct, abs=1e-3)
    generated = lm.generate_until([instance("generate_until", ("Ana Lopez was born in", {"until": ["."],
                                                                                         "max_gen_toks": 6}))])
    greedy = scoring.generate_completions(model, [[tokenizer.bos_id, *tokenizer.encode("Ana Lopez was born in")]],
                                     scoring.greedy_settings(tokenizer, 6, chat=False))[0]["text"]
    assert generated == [greedy.split(".")[0]]
