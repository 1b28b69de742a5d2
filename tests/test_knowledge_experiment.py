import json

import pytest

from jaxllm.config import ConfigError
from jaxllm.lecture.knowledge_experiment import load_settings, run_experiment


def test_experiment_runs_both_stages_and_writes_the_table(tmp_path):
    settings = load_settings(None, {"people": 8, "versions": 2, "preset": "micro", "pretrain_steps": 3,
                                    "sft_steps": 2, "batch_size": 8, "seq_len": 96, "eval_people": 2,
                                    "max_new_tokens": 4, "mesh_devices": 1, "variants": ["multi+permute"],
                                    "tokenizer_vocab": 384})
    report = run_experiment(settings, tmp_path, log=lambda *_: None, progress=False)
    (result,) = report["results"]
    assert result["biographies"] == 16 and result["sft_examples"] == 4 * 6
    assert 0.0 <= result["qa_held_out_people"] <= 1.0 and 0.0 <= result["probe_held_out_people"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["variant"] == "multi+permute"
    assert "| multi+permute | 16 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "multi_permute" / "sft" / "config.yaml").exists()


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment setting"):
        load_settings(None, {"peeple": 3})
    with pytest.raises(ConfigError, match="unknown variant"):
        load_settings(None, {"variants": ["double"]})


class _CharTokenizer:
    bos_id = 2

    @staticmethod
    def encode(text):
        return [ord(c) for c in text]


def test_completion_probe_scores_the_right_value_against_its_pool(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    from jaxllm.data import biographies as bio
    from jaxllm.evaluate import scoring
    from jaxllm.lecture.knowledge_experiment import completion_probe

    people = bio.make_people(5, seed=2)

    def knows(people_known):
        def score(model_config, graphdef, params, requests, batch_size):
            logprob = []
            for context, continuation in requests:
                text = "".join(map(chr, context[1:])) + "".join(map(chr, continuation))
                person = next(p for p in people if text.startswith(p.name))
                right = person in people_known and any(text.endswith(f" {person.attribute(a)}.")
                                                       for a in ("birth_city", "university", "major", "employer"))
                logprob.append(0.0 if right else -1.0)
            return SimpleNamespace(logprob=np.array(logprob))
        return score

    config = SimpleNamespace(model=None)
    monkeypatch.setattr(scoring, "score_continuations", knows(people))
    assert completion_probe(config, None, None, _CharTokenizer(), people) == 1.0
    monkeypatch.setattr(scoring, "score_continuations", knows(people[:2]))
    partial = completion_probe(config, None, None, _CharTokenizer(), people)
    assert 0.4 <= partial < 1.0  # two of five people known, the rest scored as ties (the pool's first value)
