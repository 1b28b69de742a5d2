"""Generation with a KV cache: exactness against full recomputation, logits processors, sharding, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from jaxllm import checkpoint as ckpt
from jaxllm import generate as gen
from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import row_groups as row_groups_lib
from jaxllm import sampling
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm.cli import main
from jaxllm.config import MeshConfig, save_config
from jaxllm.errors import UsageError

from helpers import assert_greedy_choices_are_decided, random_params, tiny_config

CONFIG = tiny_config()
PROMPTS = [[2, 5, 9, 11, 7], [2, 8], [2, 30, 31, 40, 12, 13, 14, 15, 16], [2, 44, 45]]
GREEDY = gen.SamplingSettings(max_new_tokens=8, temperature=0.0)  # one N: the tests share compilations


@pytest.fixture(scope="module")
def model():
    graphdef, _ = model_lib.abstract_model(CONFIG.model)
    return graphdef, random_params(CONFIG.model, 0.5)  # wide logits: greedy choices are not decided by rounding


def _full_forward_greedy(graphdef, params, prompt, new_tokens, width=32):
    """Independent reference: re-run the whole sequence (right-padded, one prompt) for every token."""
    forward = jax.jit(lambda p, t, pos, seg: model_lib.apply(graphdef, p, t, pos, seg))
    ids = list(prompt)
    for _ in range(new_tokens):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        segments = (np.arange(width) < len(ids)).astype(np.int32)[None]
        positions = np.arange(width, dtype=np.int32)[None]
        ids.append(int(jnp.argmax(forward(params, tokens, positions, segments)[0, len(ids) - 1])))
        if ids[-1] == gen.EOS_ID:
            break
    return ids[len(prompt):]


def test_greedy_with_the_cache_equals_greedy_by_full_recomputation_for_prompts_of_different_lengths(model):
    graphdef, params = model
    output = gen.generate(CONFIG.model, graphdef, params, PROMPTS, GREEDY)
    for row, prompt in enumerate(PROMPTS):
        assert output.completion(row, keep_stop=True) == _full_forward_greedy(graphdef, params, prompt, 8), row
    # Streaming (one jitted decode step per token, for chat) gives the same tokens.
    assert list(gen.stream(CONFIG.model, graphdef, params, PROMPTS[2], GREEDY)) == output.completion(2, keep_stop=True)


def test_returned_logprobs_are_the_model_logprobs_of_the_sampled_tokens(model):
    graphdef, params = model
    settings = gen.SamplingSettings(max_new_tokens=8, temperature=1.0, stop_ids=())
    output = gen.generate(CONFIG.model, graphdef, params, PROMPTS, settings, rng=3)
    assert (output.lengths == 8).all() and not output.finished.any()
    width = 9 + 8
    ids = np.zeros((len(PROMPTS), width), np.int32)
    segments = np.zeros((len(PROMPTS), width), np.int32)
    for row, prompt in enumerate(PROMPTS):
        ids[row, :len(prompt) + 8] = prompt + output.tokens[row].tolist()
        segments[row, :len(prompt) + 8] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    logits = jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, ids, positions, segments)
    expected = np.asarray(losses.token_logprobs(logits, ids))
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(output.logprobs[row], expected[row, len(prompt):len(prompt) + 8], atol=2e-4)
    again = gen.generate(CONFIG.model, graphdef, params, PROMPTS, settings, rng=3)
    np.testing.assert_array_equal(again.tokens, output.tokens)  # same key, same samples


def test_generation_stops_at_eos_and_pads_after_it(model):
    graphdef, params = model
    settings = gen.SamplingSettings(max_new_tokens=8, temperature=1.0, token_bias=((gen.EOS_ID, 100.0),))
    output = gen.generate(CONFIG.model, graphdef, params, PROMPTS, settings)
    assert output.finished.all() and (output.lengths == 1).all()
    assert (output.tokens[:, 0] == gen.EOS_ID).all() and (output.tokens[:, 1:] == gen.PAD_ID).all()
    assert all(output.completion(row) == [] for row in range(len(PROMPTS)))
    assert (output.logprobs[:, 1:] == 0).all()


def test_prompts_and_settings_in_one_bucket_share_one_compilation(model):
    graphdef, params = model
    gen.generate(CONFIG.model, graphdef, params, PROMPTS, GREEDY)
    compiled = gen._generate_jit._cache_size()
    other_lengths = [[2, 5], [2, 5, 6, 7, 8, 9, 10], [2, 9, 9], [2] * 16]
    sampled = gen.SamplingSettings(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                                   repetition_penalty=1.3, token_bias=((3, 1.0),), stop_ids=(3, 4))
    gen.generate(CONFIG.model, graphdef, params, other_lengths, sampled, rng=1)
    assert gen._generate_jit._cache_size() == compiled
    assert gen.bucket(3) == gen.bucket(16) == 16 and gen.bucket(17) == 32


def test_a_short_batch_padded_to_min_rows_gives_the_same_answers_with_the_full_batch_program(model):
    graphdef, params = model
    full = gen.generate(CONFIG.model, graphdef, params, PROMPTS * 2, GREEDY)  # 8 rows
    compiled = gen._generate_jit._cache_size()
    short = gen.generate(CONFIG.model, graphdef, params, PROMPTS[:3], GREEDY, min_rows=8)
    assert gen._generate_jit._cache_size() == compiled  # the 8-row program, not a 4-row one
    assert short.tokens.shape[0] == 3
    for row in range(3):
        assert short.completion(row, keep_stop=True) == full.completion(row, keep_stop=True), row


@pytest.mark.parametrize("settings", [GREEDY, gen.SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_row_groups_side_by_side_give_the_tokens_of_one_batch(model, settings):
    graphdef, params = model
    prompts = [prompt + [row] for row in range(4) for prompt in PROMPTS]  # 16 rows
    whole = gen.generate(CONFIG.model, graphdef, params, prompts, settings, rng=3, row_groups=1)
    for groups in (2, 4):
        split = gen.generate(CONFIG.model, graphdef, params, prompts, settings, rng=3, row_groups=groups)
        # Each row draws the uniform it draws in the whole batch; the logits of a smaller batch may differ in
        # the last bits (another matmul blocking), which moves a sampled token only if its uniform falls within
        # ~1e-6 of an interval's end. The log-probabilities carry those bits through 8 decode steps (the cache
        # holds them too): up to 1.05e-5 apart (4.4e-6 relative) on an Intel Xeon with AMX, 1e-5 elsewhere; a
        # token drawn for another row, or at another step, moves them by 0.1 or more.
        np.testing.assert_array_equal(split.tokens, whole.tokens)
        np.testing.assert_array_equal(split.lengths, whole.lengths)
        np.testing.assert_array_equal(split.finished, whole.finished)
        np.testing.assert_allclose(split.logprobs, whole.logprobs, rtol=2e-5, atol=1e-5)
    with pytest.raises(UsageError, match="row_groups=3 must divide the batch of 16 rows"):
        gen.generate(CONFIG.model, graphdef, params, prompts, settings, row_groups=3)


def test_row_uniforms_of_a_group_are_its_rows_of_the_whole_draw():
    key = jax.random.key(5)
    whole = sampling.row_uniforms(key, 12)
    assert whole.shape == (12, 1)
    for offset in (0, 4, 8):
        part = jax.jit(sampling.row_uniforms, static_argnums=(1, 3))(key, 4, np.int32(offset), 12)
        np.testing.assert_array_equal(part, whole[offset:offset + 4])


def test_host_row_groups_one_per_core_on_a_cpu_device_with_enough_rows(monkeypatch):
    monkeypatch.setattr(row_groups_lib.cpu_levers, "available_cpus", lambda: 3)
    assert [gen.host_row_groups(rows) for rows in (1, 8, 15, 16, 24, 32, 64)] == [1, 1, 1, 2, 3, 2, 2]
    monkeypatch.setattr(row_groups_lib.cpu_levers, "available_cpus", lambda: 1)
    assert gen.host_row_groups(64) == 1
    monkeypatch.setattr(row_groups_lib.cpu_levers, "available_cpus", lambda: 16)
    assert gen.host_row_groups(64) == 8  # groups of at least MIN_GROUP_ROWS rows
    mesh = sharding_lib.make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
    assert gen.host_row_groups(64, mesh) == 1  # sharded over devices: the mesh parallelises


# ----------------------------------------------------------------------------------------------
# Logits processors.

LOGITS = jnp.asarray([[2.0, 1.0, 0.5, -1.0, 0.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
NOTHING_SEEN = jnp.zeros(LOGITS.shape, bool)


def test_top_k_keeps_exactly_k_tokens():
    kept = np.isfinite(np.asarray(gen.top_k(2)(LOGITS, NOTHING_SEEN)))
    assert kept.sum(axis=1).tolist() == [2, 2]
    assert kept[0].tolist() == [True, False, False, False, False, True]


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    out = np.asarray(gen.top_p(0.8)(LOGITS, NOTHING_SEEN))[0]
    order = np.argsort(-probs)
    needed = int(np.searchsorted(np.cumsum(probs[order]), 0.8) + 1)
    assert set(np.flatnonzero(np.isfinite(out))) == set(order[:needed].tolist())
    assert probs[np.isfinite(out)].sum() >= 0.8
    # A tiny p keeps just the most likely token.
    assert np.isfinite(np.asarray(gen.top_p(1e-6)(LOGITS, NOTHING_SEEN))).sum(axis=1).tolist() == [1, 1]


def test_min_p_drops_tokens_far_below_the_best():
    out = np.asarray(gen.min_p(0.3)(LOGITS, NOTHING_SEEN))[0]
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    np.testing.assert_array_equal(np.isfinite(out), probs >= 0.3 * probs.max())


def test_repetition_penalty_lowers_only_tokens_already_seen():
    seen = NOTHING_SEEN.at[0, 0].set(True).at[0, 3].set(True)
    out = np.asarray(gen.repetition_penalty(2.0)(LOGITS, seen))
    assert out[0, 0] == 1.0 and out[0, 3] == -2.0  # positive halved, negative doubled: both lower
    np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], np.asarray(LOGITS)[0, [1, 2, 4, 5]])
    np.testing.assert_array_equal(out[1], np.asarray(LOGITS)[1])


def test_eos_bias_and_composition_order_change_the_greedy_choice():
    pick = jax.jit(gen.next_token)  # the settings are traced: one compilation for every case below

    def choose(settings, seen=NOTHING_SEEN, seed=0):
        return pick(LOGITS, seen, jax.random.key(seed), settings.arrays(LOGITS.shape[-1])).tolist()

    assert choose(gen.SamplingSettings(temperature=0.0)) == [5, 5]
    assert choose(gen.SamplingSettings(temperature=0.0, token_bias=((3, 5.0),))) == [3, 3]  # EOS up-weighted
    # top_k=1 sampling is greedy whatever the temperature.
    assert choose(gen.SamplingSettings(temperature=5.0, top_k=1), seed=1) == [5, 5]
    # The repetition penalty applies before greedy: seen token 5 loses to token 0 in row 0.
    penalised = gen.SamplingSettings(temperature=0.0, repetition_penalty=2.0)
    assert choose(penalised, NOTHING_SEEN.at[0, 5].set(True))[0] == 0


def test_argmax_is_jnp_argmax_with_ties_infinities_and_nan():
    rows = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [-jnp.inf] * 4, [0.0, jnp.inf, 5.0, jnp.inf],
                        [1.0, jnp.nan, 9.0, jnp.nan], [-1.0, -2.0, -jnp.inf, -0.5]])
    random = jax.random.normal(jax.random.key(0), (64, 512)).round(1)  # rounding makes ties
    for values in (rows, random):
        np.testing.assert_array_equal(gen.argmax(values), jnp.argmax(values, axis=-1))
        assert gen.argmax(values).dtype == jnp.int32


def test_greedy_fast_path_equals_the_argmax_of_the_processed_logits():
    """Greedy runs only the argmax branch of next_token: it must pick exactly jnp.argmax of the logits
    after the penalty and bias, whatever the (ignored) sampling settings and key."""
    logits = jax.random.normal(jax.random.key(1), (16, 64)) * 3
    seen = jax.random.bernoulli(jax.random.key(2), 0.2, (16, 64))
    pick = jax.jit(gen.next_token)
    for settings in (gen.SamplingSettings(temperature=0.0),
                     gen.SamplingSettings(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, token_bias=((7, 1.5),)),
                     gen.SamplingSettings(temperature=0.0, repetition_penalty=1.7)):
        params = settings.arrays(64)
        always, _ = gen.build_processors(params)
        expected = jnp.argmax(always(logits, seen), axis=-1)
        for seed in (0, 1):
            np.testing.assert_array_equal(pick(logits, seen, jax.random.key(seed), params), expected)


def test_categorical_draws_follow_the_softmax_and_never_removed_tokens():
    """Inverse transform sampling: the frequencies of many draws match softmax(logits) within a few
    standard errors, and tokens at -inf (removed by top-k/p, min-p) are never drawn."""
    logits = jnp.asarray([1.0, 2.0, -jnp.inf, 0.5, 3.0, -jnp.inf, -1.0, 2.5])
    draws = 200_000
    keys = jax.random.split(jax.random.key(0), draws // 50)
    tokens = np.asarray(jax.jit(jax.vmap(lambda key: gen.categorical(key, jnp.tile(logits, (50, 1)))))(keys)).ravel()
    probs = np.asarray(jax.nn.softmax(logits))
    frequencies = np.bincount(tokens, minlength=logits.shape[0]) / tokens.size
    assert frequencies[[2, 5]].sum() == 0
    np.testing.assert_array_less(np.abs(frequencies - probs), 5 * np.sqrt(probs * (1 - probs) / tokens.size) + 1e-6)


def test_categorical_never_draws_a_removed_token_when_the_uniform_rounds_up(monkeypatch):
    """u = U * total can round up to the total: the draw then falls back to the last token that has any
    probability, not to the last id."""
    monkeypatch.setattr(gen.jax.random, "uniform", lambda key, shape, dtype: jnp.ones(shape, dtype))
    logits = jnp.asarray([[0.0, 1.0, -jnp.inf, -jnp.inf], [-jnp.inf, 2.0, -jnp.inf, 0.0]])
    assert gen.categorical(jax.random.key(0), logits).tolist() == [1, 3]


def test_categorical_over_many_blocks_follows_the_softmax():
    """A vocabulary of several search blocks (not a multiple of the block size), with whole blocks removed,
    the last ones too: the frequencies still match softmax(logits) and removed tokens are never drawn."""
    vocab = 300
    assert vocab % sampling._cdf_block_size(vocab) != 0
    logits = np.random.default_rng(0).normal(0.0, 1.5, vocab).astype(np.float32)
    logits[32:64] = -np.inf  # a whole block (16- or 32-token blocks)
    logits[250:] = -np.inf   # the last blocks
    logits[5] = logits[100] = -np.inf
    logits = jnp.asarray(logits)
    draws = 400_000
    keys = jax.random.split(jax.random.key(1), draws // 100)
    tokens = np.asarray(jax.jit(jax.vmap(lambda key: gen.categorical(key, jnp.tile(logits, (100, 1)))))(keys)).ravel()
    probs = np.asarray(jax.nn.softmax(logits))
    frequencies = np.bincount(tokens, minlength=vocab) / tokens.size
    assert frequencies[probs == 0].sum() == 0
    np.testing.assert_array_less(np.abs(frequencies - probs), 5 * np.sqrt(probs * (1 - probs) / tokens.size) + 1e-6)


@hypothesis_settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([1, 7, 16, 17, 300, 700]), removed=st.floats(0.0, 0.95),
       uniform=st.floats(0.0, 1.0, exclude_max=True))
def test_inverse_transform_picks_the_interval_that_holds_u(seed, vocab, removed, uniform):
    """Against a float64 reference: for u = U * total the drawn token j has cdf[j-1] <= u < cdf[j] (up to
    float32 rounding at the interval's ends) and always a positive weight."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, vocab).astype(np.float32)
    logits[rng.random(vocab) < removed] = -np.inf
    logits[rng.integers(vocab)] = rng.normal()  # at least one token left
    drawn = int(_inverse_transform(jnp.asarray(logits)[None], jnp.full((1, 1), uniform, jnp.float32))[0])
    weights = np.exp(logits.astype(np.float64) - logits.max())
    assert weights[drawn] > 0
    cdf = np.cumsum(weights)
    u = uniform * cdf[-1]
    slack = 1e-5 * cdf[-1]
    below = cdf[drawn - 1] if drawn else 0.0
    assert below - slack <= u <= cdf[drawn] + slack, (drawn, below, u, cdf[drawn])


_inverse_transform = jax.jit(sampling.inverse_transform)


def test_sampling_settings_reject_nonsense():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0), dict(min_p=1.0)):
        with pytest.raises(gen.UsageError):
            gen.SamplingSettings(**bad)


# ----------------------------------------------------------------------------------------------
# Sharded like training.


def test_generation_on_a_2x2x2_mesh_matches_one_device(model):
    graphdef, params = model
    mesh = sharding_lib.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    axes = state_lib.param_logical_axes(CONFIG, params)
    sharded = jax.device_put(params, sharding_lib.tree_shardings(params, axes, mesh))
    assert gen.mesh_of(sharded) is mesh
    prompts = PROMPTS * 2  # 8 rows: split over data x fsdp = 4
    on_mesh = gen.generate(CONFIG.model, graphdef, sharded, prompts, GREEDY)
    single = gen.generate(CONFIG.model, graphdef, params, PROMPTS, GREEDY)
    # Exact greedy tokens across meshes are sound because every choice is decided by a clear margin
    # (checked on a full forward of the single-device continuation), not by the last bits of a logit.
    forward = jax.jit(model_lib.apply, static_argnums=0)
    for row, prompt in enumerate(PROMPTS):
        ids = np.asarray([prompt + single.tokens[row, :int(single.lengths[row])].tolist()], np.int32)
        logits = forward(graphdef, params, ids, np.arange(ids.shape[1], dtype=np.int32)[None], np.ones_like(ids))
        assert_greedy_choices_are_decided(logits[0, len(prompt) - 1:-1])
    np.testing.assert_array_equal(on_mesh.tokens, np.concatenate([single.tokens, single.tokens]))
    # Log-probs: float32 reordering of the sharded matmuls and softmax (a few ulps); 1e-4 leaves room.
    np.testing.assert_allclose(on_mesh.logprobs, np.concatenate([single.logprobs, single.logprobs]), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Command line (a tiny model on the embedded tokenizer's 512 ids).


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "run"
    config = tiny_config("model.vocab_size=512", "model.init_std=0.3", "mesh.num_devices=1")
    path.mkdir(parents=True)
    save_config(config, path / "config.yaml")
    params = random_params(config.model, 0.3)
    optimizer = state_lib.make_optimizer(config.optimizer, 1)
    manager = ckpt.make_manager(path, async_save=False)
    ckpt.save(manager, 1, state_lib.create_state(params, optimizer, 0), {}, {}, force=True)
    manager.wait_until_finished()
    return path, params


def test_load_model_for_inference_restores_the_saved_params(workdir):
    path, params = workdir
    config, _, loaded, tokenizer = gen.load_model_for_inference(path)
    assert config.model.vocab_size == 512 and tokenizer.vocab_size == 512
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]))


def test_generate_cli_writes_one_json_line_per_prompt(workdir, tmp_path, capsys):
    path, _ = workdir
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Where was Noor Nguyen born?"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n" +
                       json.dumps({"text": "Noor Nguyen was born in"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(path), "--prompts-file", str(prompts), "--chat", "--out", str(out),
                 "--max-new-tokens", "6", "--greedy", "--eos-bias", "1.0", "--bias", "5=-1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records][0] == "Where was Noor Nguyen born?" and len(records) == 3
    assert all(isinstance(r["completion"], str) and 0 <= r["tokens"] <= 6 for r in records)
    # Same batch and prompt buckets as above: no new compilation.
    assert main(["generate", "--checkpoint", str(path), "--prompt", "Noor", "--prompt", "Theo", "--prompt", "Grace",
                 "--max-new-tokens", "6", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Noor")


def test_chat_streams_answers_and_keeps_the_conversation(workdir, monkeypatch, capsys):
    path, _ = workdir
    lines = iter(["Where was Noor Nguyen born?", "/reset", "And Theo?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--checkpoint", str(path), "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "(conversation cleared)" in out


def test_bad_generate_input_is_a_usage_error(workdir, tmp_path, capsys):
    path, _ = workdir
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "no config.yaml"),
        (["--checkpoint", str(path)], "--prompt"),
        (["--checkpoint", str(path), "--prompts-file", str(empty)], "is empty"),
        (["--checkpoint", str(path), "--prompt", "x " * 80], "max_seq_len"),
        (["--checkpoint", str(path), "--prompt", "x", "--bias", "oops"], "TOKEN=VALUE"),
        (["--checkpoint", str(path), "--prompt", "x", "--top-p", "0"], "top_p"),
    ]
    for args, message in cases:
        assert main(["generate", *args]) == 2, args
        assert message in capsys.readouterr().err, args
