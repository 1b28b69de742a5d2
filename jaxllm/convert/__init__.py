"""Hugging Face checkpoints in and out: `jaxllm convert from-hf`, `to-hf` and `merge-lora`.

    jaxllm convert from-hf HF_DIR --out WORKDIR     config.json + *.safetensors (+ tokenizer) -> a jaxllm workdir
    jaxllm convert to-hf WORKDIR --out HF_DIR       a jaxllm workdir -> config.json + model.safetensors
    jaxllm convert merge-lora WORKDIR --out WORKDIR2   LoRA adapters merged into their base -> a plain workdir

Families: Llama (2, 3, 3.x: rope_scaling linear / llama3 / yarn), Mistral, Qwen2 / 2.5 (q/k/v biases),
Qwen3 (q/k norms), Gemma (GeGLU, (1 + w) RMSNorm, sqrt(d) embedding scale) and Gemma 2 (post norms,
query_pre_attn_scalar, final logit soft-capping) when its attention soft-capping is off. Anything the
model cannot express exactly (Gemma 2's attention soft-capping, Gemma 3's per-layer RoPE, dynamic NTK
rope scaling, MLP biases, quantized weights, mixtures of experts) is a ConfigError naming the field.
Sliding windows are exact up to the window, so max_seq_len is capped at the window.

A converted workdir is a normal workdir: `config.yaml` (the matching jaxllm config), `checkpoints/0`
(Orbax, params only), the tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json with the
chat template) and `hf_source.json` (family, special token ids; used by to-hf). Any stage can
`init_from` it, `jaxllm generate` / `chat` run on it.

Layout (HF Linear weights are [out, in]; jaxllm stacks layers on a leading axis L):
    q_proj  HF [N*H, D]  -> [L, D, N, H]      k/v_proj  HF [K*H, D] -> [L, D, K, H]
    o_proj  HF [D, N*H]  -> [L, N, H, D]      gate/up   HF [F, D]   -> [L, D, F];  down HF [D, F] -> [L, F, D]
    embed   HF [V, D]    -> [V, D]            lm_head   HF [V, D]   -> [D, V]
Both sides rotate (first half, second half) of each head (HF `rotate_half`), so no permutation is needed.

Memory: safetensors are memory-mapped and read one tensor at a time; each jaxllm leaf is assembled
layer by layer and placed on the devices (sharded over `--fsdp` devices) before the next, so the host
never holds two copies of the model. to-hf writes shards of at most `--max-shard-gb` one after another.
Reading and writing safetensors uses the `safetensors` library (`pip install jaxllm[hf]`).

Modules: `hf_config` (config.json <-> ModelConfig per family), `tensor_map` (HF tensor names and layouts
per jaxllm leaf), `safetensors_io` (reading and writing the weights), `hf_import` (from-hf), `hf_export`
(to-hf, merge-lora). A new family: its config rules in hf_config and its tensors in tensor_map, with a
logit-parity test in tests/test_convert.py.
"""
