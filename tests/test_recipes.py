"""Built-in recipes shipped as package data, and the vocabulary size taken from the tokenizer."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxllm.cli import main
from jaxllm.config import ConfigError, builtin_recipes, load_config, resolve_recipe, vocab_size_for
from jaxllm.data import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
STAGE_RECIPES = ("pretrain_tiny", "sft_tiny", "dpo_tiny", "kto_tiny", "reward_tiny", "rl_grpo_tiny")


def test_every_checkout_recipe_is_a_builtin_recipe_by_name():
    shipped = builtin_recipes()
    assert set(shipped) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for name in STAGE_RECIPES:
        by_name = load_config(name, ["model.preset=micro"])
        by_path = load_config(ROOT / "configs" / f"{name}.yaml", ["model.preset=micro"])
        assert by_name == by_path


def test_an_existing_file_wins_over_a_builtin_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain_tiny.yaml").write_text("train: {steps: 7}\n")
    assert load_config("configs/pretrain_tiny.yaml").train.steps == 7
    shipped = load_config(ROOT / "configs" / "pretrain_tiny.yaml").train.steps
    assert shipped != 7 and load_config("pretrain_tiny").train.steps == shipped  # a bare name: the built-in recipe


def test_an_unknown_recipe_name_is_one_error_naming_the_closest_builtin():
    expected = r"recipe file pretrain_tinny does not exist.*did you mean 'pretrain_tiny'.*jaxllm recipes"
    with pytest.raises(ConfigError, match=expected):
        resolve_recipe("pretrain_tinny")
    with pytest.raises(ConfigError, match="does not exist and is not a built-in recipe"):
        resolve_recipe("some/dir/sft_tiny.yaml")  # a path with other directories is never a built-in name


def test_recipes_command_lists_each_builtin_with_one_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(builtin_recipes())
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # every recipe has a description
    assert any(line.startswith("pretrain_tiny ") and "next-token prediction" in line for line in lines)


def test_wheel_ships_the_recipes_and_they_resolve_outside_the_checkout(tmp_path):
    """A non-editable build: the wheel holds jaxllm/recipes/*.yaml, and from an unrelated directory,
    importing the unpacked wheel (not the checkout), recipes load by name and a pipeline recipe's stage
    recipes (`configs/pretrain_tiny.yaml`) resolve to the shipped files."""
    pytest.importorskip("setuptools", reason="the offline wheel build (--no-build-isolation) needs setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("jaxllm", "configs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("jaxllm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(n).name for n in archive.namelist() if n.startswith("jaxllm/recipes/")}
        archive.extractall(tmp_path / "site")
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import jaxllm, jaxllm.config as c, jaxllm.pipeline as p; "
              "assert jaxllm.__file__.startswith(%r), jaxllm.__file__; "
              "print(c.load_config('pretrain_tiny').train.stage, c.load_config('configs/sft_tiny.yaml').train.stage, "
              "[str(p.resolve_path(s.recipe).parent) == str(c.builtin_recipe_dir()) "
              "for s in p.load_recipe('configs/pipeline_tiny.yaml').stages])" % str(tmp_path / "site"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
    ran = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["pretrain", "sft", "[True,", "True,", "True]"]


# -- vocabulary size from the tokenizer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_300(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.txt"
    corpus.write_text("".join(f"Document {i} talks about the weather in town number {i % 37}.\n" for i in range(400)))
    train_tokenizer([str(corpus)], 300, str(directory / "tok"))
    return directory / "tok"


def test_vocab_size_rounds_up_to_a_multiple_of_128():
    assert [vocab_size_for(n) for n in (1, 128, 129, 400, 512, 32000, 151646)] == [128, 128, 256, 512, 512, 32000,
                                                                                 151680]


def test_vocab_size_comes_from_the_tokenizer_unless_the_recipe_fixes_it(tokenizer_300):
    messages = []
    config = load_config("pretrain_tiny", [f"data.tokenizer={tokenizer_300}"], log=messages.append)
    assert config.model.vocab_size == 384
    assert len(messages) == 1 and "300 ids, rounded up to a multiple of 128" in messages[0]
    # A preset's nominal vocabulary (8192 for small) does not fix it; the default tokenizer has 512 ids.
    assert load_config(None, ["model.preset=small"]).model.vocab_size == 512
    fixed = load_config("pretrain_tiny", [f"data.tokenizer={tokenizer_300}", "model.vocab_size=1000"],
                        log=messages.append)
    assert fixed.model.vocab_size == 1000 and len(messages) == 1


def test_dry_run_uses_the_derived_size_and_rejects_a_fixed_size_below_the_tokenizer(tokenizer_300, tmp_path, capsys):
    args = ["train", "pretrain_tiny", "--workdir", str(tmp_path / "run"), "--dry-run", "model.preset=micro",
            f"data.tokenizer={tokenizer_300}", "mesh.num_devices=1", "train.batch_size=2", "data.seq_len=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model.vocab_size=384: from the tokenizer" in out
    assert main(args + ["model.vocab_size=256"]) == 2
    error = capsys.readouterr().err
    assert "has 300 ids but model.vocab_size is 256" in error and "Set model.vocab_size=300" in error
    assert not (tmp_path / "run").exists()
