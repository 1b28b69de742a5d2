import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib
from jaxllm.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                     attention_block_size=8)
IMPLEMENTATIONS = ["reference", "xla", "blockwise"]


def _inputs(batch=2, length=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 64, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)
    return tokens, positions, segments


def _forward(impl, params, tokens, positions, segments, **overrides):
    config = dataclasses.replace(CONFIG, attention=impl, **overrides)
    graphdef, _ = model_lib.abstract_model(config)
    return jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens, positions, segments)


@pytest.fixture(scope="module")
def params():
    return model_lib.init_model(CONFIG, seed=0)[1]


def test_param_shapes_and_logical_axes_match(params):
    axes = model_lib.logical_axes(CONFIG)
    jax.tree.map(lambda p, a: chex.assert_rank(p, len(a)), params, axes, is_leaf=lambda x: isinstance(x, tuple))
    chex.assert_shape(params["blocks"]["attention"]["q_proj"], (2, 32, 4, 8))
    chex.assert_shape(params["blocks"]["attention"]["k_proj"], (2, 32, 2, 8))
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_implementations_agree_with_reference(params, impl):
    tokens, positions, segments = _inputs()
    expected = _forward("reference", params, tokens, positions, segments)
    got = _forward(impl, params, tokens, positions, segments)
    chex.assert_shape(got, (2, 32, 64))
    assert got.dtype == jnp.float32
    # Another implementation of the same float32 attention (block order, fused softmax): logits of order 1
    # differ by reordering only; 2e-5 is ~100 ulps (see tests/helpers.py on cross-program comparisons).
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_changing_a_token_never_changes_earlier_logits(params, impl):
    tokens, positions, segments = _inputs()
    t = 20
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    before = _forward(impl, params, tokens, positions, segments)
    after = _forward(impl, params, changed, positions, segments)
    np.testing.assert_allclose(before[:, :t], after[:, :t], atol=1e-6)
    assert np.abs(np.asarray(before[:, t:] - after[:, t:])).max() > 1e-4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_segment_ids_block_cross_document_attention(params, impl):
    tokens, _, _ = _inputs(length=32)
    split = 13  # document 1: [0, 13), document 2: [13, 32)
    segments = jnp.asarray(np.where(np.arange(32) < split, 1, 2)[None].repeat(2, 0), jnp.int32)
    positions = jnp.asarray(np.where(np.arange(32) < split, np.arange(32), np.arange(32) - split)[None].repeat(2, 0),
                            jnp.int32)
    other = tokens.at[:, split:].set((tokens[:, split:] + 7) % 64)
    first = _forward(impl, params, tokens, positions, segments)
    second = _forward(impl, params, other, positions, segments)
    np.testing.assert_allclose(first[:, :split], second[:, :split], atol=1e-6)
    # Document 2 alone (as the only document of a row) gives the same logits as inside the pack.
    alone = _forward(impl, params, other[:, split:], positions[:, split:], jnp.ones_like(segments[:, split:]))
    np.testing.assert_allclose(second[:, split:], alone, atol=2e-5)


def test_changing_document_one_never_changes_document_two_in_the_same_row(params):
    tokens, _, _ = _inputs(length=32)
    segments = jnp.asarray(np.where(np.arange(32) < 16, 1, 2)[None].repeat(2, 0), jnp.int32)
    positions = jnp.asarray((np.arange(32) % 16)[None].repeat(2, 0), jnp.int32)
    other = tokens.at[:, :16].set((tokens[:, :16] + 3) % 64)
    for impl in IMPLEMENTATIONS:
        a = _forward(impl, params, tokens, positions, segments)
        b = _forward(impl, params, other, positions, segments)
        np.testing.assert_allclose(a[:, 16:], b[:, 16:], atol=1e-6)


def test_remat_and_unscanned_layers_give_the_same_logits(params):
    tokens, positions, segments = _inputs()
    base = _forward("reference", params, tokens, positions, segments)
    for overrides in ({"remat": "full"}, {"remat": "dots"}, {"scan_layers": False}, {"scan_layers": True}):
        np.testing.assert_allclose(_forward("reference", params, tokens, positions, segments, **overrides), base,
                                   atol=1e-5)


@pytest.mark.parametrize("contract, in_shape, out_shapes", [
    (1, (32,), ((48,),)),  # I <= O: the rows are transposed for the weight gradient
    (1, (48,), ((16,),)),  # O < I: the cotangent is transposed instead
    (1, (32,), ((4, 8), (2, 8), (2, 8))),  # q/k/v sharing one transposed input
    (2, (4, 8), ((32,),)),  # the output projection: two contracted dims
])
def test_matmul_rows_values_and_gradients_equal_the_einsum(contract, in_shape, out_shapes):
    keys = jax.random.split(jax.random.key(0), 2 + len(out_shapes))
    x = jax.random.normal(keys[0], (2, 5, *in_shape))
    weights = tuple(jax.random.normal(k, in_shape + o) for k, o in zip(keys[2:], out_shapes))
    cotangents = [jax.random.normal(jax.random.fold_in(keys[1], i), (2, 5, *o)) for i, o in enumerate(out_shapes)]

    def loss(fn):
        return lambda x, ws: sum(jnp.sum(out * c) for out, c in zip(fn(x, ws), cotangents))

    ours = lambda x, ws: model_lib.matmul_rows_shared(x, ws, contract)  # noqa: E731
    plain = lambda x, ws: tuple(jnp.tensordot(x, w, axes=contract) for w in ws)  # noqa: E731
    for got, expected in zip(jax.jit(ours)(x, weights), plain(x, weights)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    got_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, weights)
    expected_grads = jax.grad(loss(plain), argnums=(0, 1))(x, weights)
    chex.assert_trees_all_close(got_grads, expected_grads, rtol=1e-5, atol=1e-4)


def test_scan_layers_auto_unrolls_on_cpu_and_yaml_booleans_still_choose():
    from jaxllm.config import load_config

    assert not model_lib.scans_layers(dataclasses.replace(CONFIG, scan_layers="auto"))  # the tests run on CPU
    assert model_lib.scans_layers(load_config(None, ["model.scan_layers=true"]).model)
    assert not model_lib.scans_layers(load_config(None, ["model.scan_layers=false"]).model)
    assert load_config(None, ["model.scan_layers=True"]).model.scan_layers == "true"


def test_forward_only_programs_scan_the_layers_the_train_step_unrolls():
    """forward_config: scan_layers auto -> one scan (forward-only programs compile faster and run as fast
    on CPU); an explicit choice is kept. A stage's eval step runs on it (DPO's: the policy's and the
    reference's forward); its train step does not."""
    from jaxllm import sharding as sharding_lib
    from jaxllm import step_builder
    from jaxllm.config import load_config

    assert model_lib.scans_layers(model_lib.forward_config(dataclasses.replace(CONFIG, scan_layers="auto")))
    assert not model_lib.scans_layers(model_lib.forward_config(dataclasses.replace(CONFIG, scan_layers="false")))
    for stage, train_scans, eval_scans in (("pretrain", 0, 1), ("dpo", 0, 2)):  # dpo eval: policy + reference
        config = load_config(None, ["model.preset=micro", "model.vocab_size=64", "data.seq_len=16",
                                    "train.batch_size=2", f"train.stage={stage}"])
        built = step_builder.build(config, sharding_lib.make_mesh(config.mesh))
        batch = built.stage.update_batch_spec(config)
        train = str(jax.make_jaxpr(built.train_step)(built.abstract_state, batch, built.reference_abstract,
                                                     jnp.float32(jnp.inf)))
        evaluate = str(jax.make_jaxpr(built.eval_step)(built.abstract_state.params, batch, built.reference_abstract))
        assert (train.count(" scan["), evaluate.count(" scan[")) == (train_scans, eval_scans), stage


def test_init_compiled_for_compile_speed_gives_the_same_params_to_float32_rounding():
    from jaxllm.train import compile_once_run

    init = jax.jit(lambda: model_lib.init_model(CONFIG, 3)[1])
    chex.assert_trees_all_close(compile_once_run(init)(), init(), rtol=1e-6, atol=1e-9)


def test_kv_cache_prefill_and_decode_match_full_forward(params):
    tokens, positions, segments = _inputs(length=16)
    full = _forward("reference", params, tokens, positions, segments)
    graphdef, _ = model_lib.abstract_model(CONFIG)
    cache = model_lib.init_cache(CONFIG, 2, 16)
    logits, cache = model_lib.apply_with_cache(graphdef, params, tokens[:, :10], positions[:, :10], segments[:, :10],
                                               cache)
    np.testing.assert_allclose(logits, full[:, :10], atol=2e-5)
    for t in range(10, 16):
        step_logits, cache = model_lib.apply_with_cache(graphdef, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                                        segments[:, t:t + 1], cache)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=2e-5)
    assert int(cache["index"]) == 16


def test_prefill_of_the_last_position_alone_gives_its_logits_and_the_same_cache(params):
    """generate's prefill samples from the last position only (`last_only`): the lm head skips the prompt."""
    tokens, positions, segments = _inputs(length=12)
    graphdef, _ = model_lib.abstract_model(CONFIG)
    step = jax.jit(model_lib.apply_with_cache, static_argnums=(0, 7))
    full, full_cache = step(graphdef, params, tokens, positions, segments, model_lib.init_cache(CONFIG, 2, 16))
    last, last_cache = step(graphdef, params, tokens, positions, segments, model_lib.init_cache(CONFIG, 2, 16), None,
                            True)
    chex.assert_shape(last, (2, 1, CONFIG.vocab_size))
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, last_cache, full_cache)


def test_decode_with_layers_split_once_equals_slicing_them_in_the_step(params):
    """generate splits the stacked layer params once before its loop (model.layer_params); the logits
    and the cache must be exactly those of the default path, which slices them inside the call."""
    tokens, positions, segments = _inputs(length=12)
    graphdef, _ = model_lib.abstract_model(CONFIG)
    step = jax.jit(model_lib.apply_with_cache, static_argnums=0)
    cache = model_lib.init_cache(CONFIG, 2, 12)
    _, cache = step(graphdef, params, tokens[:, :11], positions[:, :11], segments[:, :11], cache)
    sliced, sliced_cache = step(graphdef, params, tokens[:, 11:], positions[:, 11:], segments[:, 11:], cache)
    split, split_cache = step(graphdef, params, tokens[:, 11:], positions[:, 11:], segments[:, 11:], cache,
                              model_lib.layer_params(params))
    np.testing.assert_array_equal(split, sliced)
    jax.tree.map(np.testing.assert_array_equal, split_cache, sliced_cache)
    assert len(split_cache["k"]) == CONFIG.num_layers and split_cache["k"][0].shape == (2, 2, 8, 12)  # [B,K,H,S]


def test_kv_cache_decode_matches_full_forward_with_unscanned_layers_and_padding(params):
    """The cached path unrolls the layers whatever scan_layers says; left padding (segment 0) and a
    second document must be masked in the cache exactly as in the full forward pass."""
    config = dataclasses.replace(CONFIG, scan_layers=False)
    graphdef, _ = model_lib.abstract_model(config)
    tokens, _, _ = _inputs(length=14)
    segments = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]],
                           jnp.int32)
    positions = jnp.asarray([[0, 0] + list(range(12)), list(range(4)) + list(range(10))], jnp.int32)
    full = jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens, positions, segments)
    cache = model_lib.init_cache(config, 2, 14)
    step = jax.jit(model_lib.apply_with_cache, static_argnums=0)
    logits, cache = step(graphdef, params, tokens[:, :9], positions[:, :9], segments[:, :9], cache)
    real = np.asarray(segments[:, :9]) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, :9])[real], atol=2e-5)
    for t in range(9, 14):
        logits, cache = step(graphdef, params, tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1],
                             cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5)


def test_bfloat16_model_on_cpu_decodes_over_a_float32_cache_holding_its_bf16_keys(params):
    """On CPU a 16-bit model's cache is float32 (XLA CPU converted a bf16 cache to float32 in every layer of every
    decode step): the cached keys are exactly the model's bf16 keys, and decoding over it gives the logits a bf16
    cache gives, within bf16 rounding of the attention weights."""
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    assert model_lib.default_cache_dtype(config) == "float32" and model_lib.default_cache_dtype(CONFIG) == "float32"
    graphdef, _ = model_lib.abstract_model(config)
    tokens, positions, segments = _inputs(length=12)
    step = jax.jit(model_lib.apply_with_cache, static_argnums=0)
    caches = {dtype: model_lib.init_cache(config, 2, 12, dtype) for dtype in (None, "bfloat16")}
    assert caches[None]["k"][0].dtype == jnp.float32
    outputs = {}
    for dtype, cache in caches.items():
        logits, cache = step(graphdef, params, tokens[:, :8], positions[:, :8], segments[:, :8], cache)
        steps = [logits[:, -1]]
        for t in range(8, 12):
            logits, cache = step(graphdef, params, tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1],
                                 cache)
            steps.append(logits[:, 0])
        outputs[dtype] = (np.stack(steps), cache)
    np.testing.assert_array_equal(outputs[None][1]["k"][0], outputs["bfloat16"][1]["k"][0].astype(jnp.float32))
    # 1e-3 apart here (logits up to 0.63): the bf16 cache rounds the attention weights to bf16
    np.testing.assert_allclose(outputs[None][0], outputs["bfloat16"][0], atol=1e-2)


def test_untied_embeddings_and_bfloat16_compute_run():
    config = dataclasses.replace(CONFIG, tie_embeddings=False, dtype="bfloat16")
    graphdef, params = model_lib.init_model(config, 0)
    assert "lm_head" in params
    tokens, positions, segments = _inputs()
    logits = jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens, positions, segments)
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


def test_flops_per_token_counts_dense_and_attention_terms():
    flops = model_lib.flops_per_token(CONFIG, 32)
    d, f, layers = 32, CONFIG.resolved_d_ff, 2
    per_layer = d * 4 * 8 + 2 * d * 2 * 8 + 4 * 8 * d + 3 * d * f
    assert flops == 6 * (layers * per_layer + d * 64) + 12 * layers * 32 * 4 * 8


def test_rotary_embedding_matches_rotate_half_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 100, (2, 5))
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = positions[..., None, None] * np.concatenate([inv_freq, inv_freq])  # [B,T,1,H]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    expected = x * np.cos(angles) + rotate_half * np.sin(angles)
    got = model_lib.rotary_embedding(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation_value_and_gradients_match_autodiff(activation):
    rng = np.random.default_rng(4)
    gate, up, cotangent = (jnp.asarray(rng.normal(size=(3, 4, 6)).astype(np.float32)) for _ in range(3))

    def plain(g, u):
        return model_lib._ACTIVATIONS[activation](g) * u

    value, vjp = jax.vjp(lambda g, u: model_lib.gated_activation(activation, g, u), gate, up)
    expected_value, expected_vjp = jax.vjp(plain, gate, up)
    chex.assert_trees_all_close(value, expected_value, rtol=1e-6)
    chex.assert_trees_all_close(vjp(cotangent), expected_vjp(cotangent), rtol=1e-5, atol=1e-6)


def test_blockwise_attention_gradients_match_reference_with_documents_and_padding():
    """The hand-written block-causal backward against autodiff of the reference: grouped heads, two
    documents per row and all-padding query rows at the end (which must get no gradient through masks)."""
    rng = np.random.default_rng(5)
    batch, length, heads, kv_heads, head_dim = 2, 32, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)) for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    segments = jnp.asarray(np.concatenate([np.ones((batch, 13)), 2 * np.ones((batch, 14)), np.zeros((batch, 5))],
                                          axis=1).astype(np.int32))

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v, index, index, segments, segments) * cotangent)

    expected = jax.grad(lambda *a: loss(model_lib.reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
    blockwise = lambda *a: model_lib.blockwise_attention(*a, block_size=8)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(blockwise, *a), argnums=(0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)


def _dot_operand_dtypes(hlo_text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in an optimized HLO module's text (fusion parameters included)."""
    pairs = []
    for computation in re.split(r"\n(?=%\S+ \(|ENTRY )", hlo_text):
        types = dict(re.findall(r"([\w.\-]+): (\w+)\[", computation.split("\n", 1)[0]))
        types.update(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
        pairs += [(types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", computation)]
    return pairs


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_gradients_run_every_matmul_in_bfloat16_on_cpu(tied):
    """A bf16 model's backward keeps its matmuls in bf16 (XLA CPU upcasts a bf16 dot whose operand is a plain
    transpose: on AMX CPUs the bf16 step was then only 1.2x float32's, now ~1.9x) and its gradients follow float32's."""
    config = dataclasses.replace(CONFIG, tie_embeddings=tied, dtype="bfloat16")
    graphdef, params = model_lib.init_model(config, 0)
    f32_graphdef, _ = model_lib.abstract_model(dataclasses.replace(config, dtype="float32"))
    tokens, positions, segments = _inputs(batch=4)

    def loss(graphdef, params):
        logits = model_lib.apply(graphdef, params, tokens, positions, segments)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    dots = _dot_operand_dtypes(grad.lower(graphdef, params).compile().as_text())
    assert len(dots) >= 6 * config.num_layers and set(dots) == {("bf16", "bf16")}, sorted(set(dots))
    got, exact = grad(graphdef, params), grad(f32_graphdef, params)
    errors = jax.tree.map(lambda g, e: float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e)), got, exact)
    # bf16 rounds each operand to 8 bits (~0.4%): 0.3-0.9% per leaf here; a wrong transpose would be ~100%
    assert max(jax.tree.leaves(errors)) < 0.02, errors
