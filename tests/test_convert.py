"""Hugging Face import/export: logit parity per family, exact round trips, tokenizers, clear errors.

Small random models are built with `transformers` (CPU PyTorch; test-only dependencies) and saved to a
temporary folder; nothing is downloaded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxllm import model as model_lib  # noqa: E402
from jaxllm.config import ConfigError, ModelConfig  # noqa: E402
from jaxllm.convert import hf_export, hf_import  # noqa: E402
from jaxllm.convert.hf_config import hf_config_from_model, model_config_from_hf  # noqa: E402

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

FAMILIES = {
    "llama3_rope": lambda: transformers.LlamaConfig(**SIZES, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_bias_linear_tied": lambda: transformers.LlamaConfig(**SIZES, attention_bias=True, tie_word_embeddings=True,
                                                               rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral_window": lambda: transformers.MistralConfig(**{**SIZES, "max_position_embeddings": 256},
                                                         sliding_window=32, head_dim=12),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=True),
    "qwen3_yarn": lambda: transformers.Qwen3Config(**SIZES, head_dim=16, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "gemma": lambda: transformers.GemmaConfig(**{**SIZES, "num_key_value_heads": 1}, head_dim=16),
    "gemma2_no_attn_softcap": lambda: transformers.Gemma2Config(
        **SIZES, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=None, final_logit_softcapping=3.0,
        sliding_window=32),
}


def _random_hf_model(hf_config, seed: int = 0):
    """A transformers model whose every weight is random (norm scales around their neutral value)."""
    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    gemma = hf_config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = 0.2 * torch.randn_like(parameter)
            if name.endswith("norm.weight") and not gemma:
                noise += 1.0
            parameter.copy_(noise)
    return model.eval()


def _tokens(vocab: int, batch: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _jax_logits(model_config: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    config = ModelConfig(**{**model_config.__dict__, "attention": "reference"})
    graphdef, _ = model_lib.abstract_model(config)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    segments = np.ones_like(tokens)
    return np.asarray(jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens, positions, segments))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_converted_model_logits_match_transformers(tmp_path, name):
    hf_model = _random_hf_model(FAMILIES[name]())
    hf_model.save_pretrained(tmp_path)
    conversion = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    params = hf_import.load_hf_params(tmp_path, conversion.model, conversion.family)
    tokens = _tokens(SIZES["vocab_size"])
    got, expected = _jax_logits(conversion.model, params, tokens), _hf_logits(hf_model, tokens)
    assert got.shape == expected.shape
    # Two implementations (PyTorch eager vs XLA) of the same float32 network: logits of order 1 differ by
    # reordered sums (a few ulps per term); 1e-4 absolute leaves room for other CPUs' kernels.
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if name == "mistral_window":
        assert conversion.model.max_seq_len == 32 and any("sliding_window" in n for n in conversion.notes)


def test_sharded_bfloat16_checkpoint_converts_tensor_by_tensor(tmp_path):
    hf_model = _random_hf_model(FAMILIES["qwen3_yarn"]()).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    conversion = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert conversion.model.param_dtype == "bfloat16"
    params = hf_import.load_hf_params(tmp_path, conversion.model, conversion.family)
    q = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [N*H, D]
    got = np.asarray(params["blocks"]["attention"]["q_proj"][1], np.float32)  # [D, N, H]
    np.testing.assert_array_equal(got, q.T.reshape(got.shape))


def _tiny_jaxllm(**fields) -> tuple[ModelConfig, dict]:
    config = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                         max_seq_len=64, **fields)
    _, params = model_lib.init_model(config, seed=1)
    # Give norms, biases and zero-initialised parts random values so every tensor is checked.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return config, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("fields", [
    dict(tie_embeddings=False),
    dict(qk_norm=True, rope_scaling="llama3", rope_scaling_factor=4.0, rope_original_max_len=16),
    dict(norm_unit_offset=True, scale_embeddings=True, post_norms=True, mlp_activation="gelu_tanh", head_dim=16,
         attention_scale=24**-0.5, final_logit_softcap=5.0),
], ids=["llama", "qwen3", "gemma2"])
def test_round_trip_jaxllm_to_hf_to_jaxllm_is_bit_exact(tmp_path, fields):
    from jaxllm.config import Config

    model_config, params = _tiny_jaxllm(**fields)
    config = Config(model=model_config)
    config.data.seq_len = 32
    workdir = hf_import.write_workdir(tmp_path / "run", config, params, {})
    hf_dir = hf_export.to_hf(workdir, tmp_path / "hf", log=lambda _: None)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True,
                                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = _tokens(96, seed=3)
    np.testing.assert_allclose(_hf_logits(hf_model, tokens), _jax_logits(model_config, params, tokens), atol=1e-4)
    # Export then import copies the same float32 arrays: bit-exact.
    back = hf_import.from_hf(hf_dir, tmp_path / "back", log=lambda _: None)
    _, reloaded = hf_export.load_workdir_params(back)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reloaded)


def _bpe_tokenizer_folder(directory, chat_template: str | None) -> None:
    """A small byte-level BPE tokenizer trained here, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "Grüße aus München: Straße, Käse!",
              "Привет, мир! Как дела?", "你好，世界。今天天气很好。", "こんにちは世界", "مرحبا بالعالم",
              "Numbers 12345 and emoji 🙂🚀 mixed with code: def f(x): return x**2"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "model_max_length": 64}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MIXED_TEXT = "Grüße, мир! 你好 🙂 — naïve café: 3.14 <|im_end|> done"


def test_tokenizer_matches_transformers_on_mixed_script_text(tmp_path):
    from jaxllm.data.tokenizer import Tokenizer

    _bpe_tokenizer_folder(tmp_path, QWEN_STYLE_TEMPLATE)
    ours = Tokenizer.load(tmp_path)  # a Hugging Face folder loads as HFTokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode(MIXED_TEXT)
    assert ids == theirs.encode(MIXED_TEXT, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids).replace("<|im_end|>", "")  # EOS decodes to nothing
    assert ours.encode_batch([MIXED_TEXT, "abc"]) == [ids, ours.encode("abc")]
    assert b"".join(ours.piece_bytes(i) for i in ours.encode("Grüße 你好")) == "Grüße 你好".encode()
    assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Привет?"},
                {"role": "assistant", "content": "你好!"}, {"role": "user", "content": "2+2?"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    from jaxllm.data.chat import prompt_ids, render_chat

    assert prompt_ids(messages, ours) == list(expected)
    ids, mask = render_chat(messages[:3], ours)
    answer = [i for i, m in zip(ids, mask) if m]
    assert ours.decode(answer) == "你好!\n" and answer[-2] == ours.eos_id  # content + <|im_end|> + newline
    assert ours.user_id == ours.eos_id  # the chat loop stops at the template's end of turn


def test_converted_workdir_loads_for_generation_with_its_tokenizer(tmp_path):
    from jaxllm import generate

    hf_model = _random_hf_model(FAMILIES["qwen2_tied"]())
    hf_model.save_pretrained(tmp_path / "hf")
    _bpe_tokenizer_folder(tmp_path / "hf", QWEN_STYLE_TEMPLATE)
    from jaxllm.data.report import DataError

    with pytest.raises(DataError, match="model.vocab_size"):  # 400 tokenizer ids, a 96-row embedding table
        hf_import.from_hf(tmp_path / "hf", tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()
    hf_model = _random_hf_model(transformers.Qwen2Config(**{**SIZES, "vocab_size": 400}, tie_word_embeddings=True))
    hf_model.save_pretrained(tmp_path / "hf2")
    _bpe_tokenizer_folder(tmp_path / "hf2", QWEN_STYLE_TEMPLATE)
    workdir = hf_import.from_hf(tmp_path / "hf2", tmp_path / "run2", log=lambda _: None)
    config, graphdef, params, tokenizer = generate.load_model_for_inference(workdir)
    assert type(tokenizer).__name__ == "HFTokenizer" and config.model.attention_bias
    from jaxllm.data.chat import prompt_ids

    ids = prompt_ids([{"role": "user", "content": "Hallo"}], tokenizer)
    settings = generate.SamplingSettings(max_new_tokens=4, temperature=0.0, stop_ids=(tokenizer.eos_id,))
    output = generate.generate(config.model, graphdef, params, [ids], settings, jax.random.key(0),
                               pad_id=tokenizer.pad_id)
    greedy = _hf_logits(hf_model, np.asarray([ids]))[0, -1].argmax()
    assert output.completion(0)[0] == greedy


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma3"}, "gemma3"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"num_local_experts": 8}, "num_local_experts"),
])
def test_unsupported_config_fields_are_clear_errors(change, field):
    base = transformers.LlamaConfig(**SIZES).to_dict()
    with pytest.raises(ConfigError, match=field):
        model_config_from_hf({**base, **change})


def test_to_hf_refuses_a_model_the_family_cannot_express(tmp_path):
    model_config = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True)
    with pytest.raises(ConfigError, match="model.qk_norm"):
        hf_config_from_model(model_config, "llama")
    with pytest.raises(ConfigError, match="no config.json"):
        hf_import.from_hf(tmp_path, tmp_path / "out", log=lambda _: None)


def test_rope_scaling_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3_rope", "qwen3_yarn", "llama_bias_linear_tied"):
        hf_config = FAMILIES[name]()
        kind = hf_config.rope_parameters["rope_type"]
        expected, factor = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
        model_config = model_config_from_hf(hf_config.to_dict()).model
        got, got_factor = model_lib.rope_frequencies(model_config)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
        assert got_factor == pytest.approx(factor)
    assert jnp.isfinite(jnp.asarray(got)).all()


def test_cli_reports_a_missing_model_folder_as_a_usage_error(tmp_path, capsys):
    from jaxllm import cli

    assert cli.main(["convert", "from-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_sentencepiece_tokenizer_model_matches_transformers_llama_tokenizer(tmp_path):
    import sentencepiece as spm

    from jaxllm.data.hf_tokenizer import HFTokenizer

    corpus = ["The quick brown fox jumps over the lazy dog.", "Grüße aus München: Straße, Käse!",
              "Привет, мир! Как дела?", "你好，世界。今天天气很好。", "Numbers 12345 and emoji mixed"] * 40
    (tmp_path / "corpus.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.Train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=420, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False}))
    ours, theirs = HFTokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    for text in (MIXED_TEXT, "Hello</s> world", " leading space", "two\nlines  and  spaces"):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    # The add-BOS rule (what `jaxllm generate --prompt` puts first) as transformers encodes a text:
    # tokenizer_config.json's add_bos_token when present (Llama 2 says true), else nothing.
    for add_bos in (None, True, False):
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config.pop("add_bos_token", None)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            config if add_bos is None else {**config, "add_bos_token": add_bos}))
        ours, theirs = HFTokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
        assert ours.prefix_ids == ((1,) if add_bos else ()), add_bos
        assert [*ours.prefix_ids, *ours.encode(MIXED_TEXT)] == theirs.encode(MIXED_TEXT), add_bos


def _with_bos_template(source, directory):
    """The BPE folder of `source` re-saved with a Llama-3-style post-processor that prepends a BOS."""
    fast = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    bos = fast.token_to_id("<|im_start|>")
    fast.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", bos)])
    directory.mkdir()
    fast.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return bos


def test_generate_prompts_follow_the_tokenizers_own_add_bos_rule_like_transformers(tmp_path):
    from jaxllm.completions import _prompt_ids
    from jaxllm.data.hf_tokenizer import HFTokenizer

    _bpe_tokenizer_folder(tmp_path / "qwen", QWEN_STYLE_TEMPLATE)  # no BOS token: EOS stands in for bos_id
    bos = _with_bos_template(tmp_path / "qwen", tmp_path / "llama3")
    for name, expected_prefix in (("qwen", ()), ("llama3", (bos,))):
        ours = HFTokenizer.load(tmp_path / name)
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        for text in ("The quick brown fox", MIXED_TEXT):
            ids = _prompt_ids({"text": text}, ours, chat=False)[1]
            assert ids == theirs.encode(text), (name, text)  # transformers' add_special_tokens=True
            assert ids[0] != ours.eos_id, (name, text)  # never EOS standing in for a missing BOS
        assert ours.prefix_ids == expected_prefix, name
