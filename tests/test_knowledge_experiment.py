import json

import pytest

from jaxllm.config import ConfigError
from jaxllm.knowledge_experiment import load_settings, run_experiment


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
