"""The configuration's schema: small nested dataclasses (one per section) and the model size presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass(unsafe_hash=True)  # hashable: it is static inside the model's graph definition
class ModelConfig:
    preset: str = ""
    vocab_size: int = 0  # 0 = the tokenizer's size rounded up to a multiple of VOCAB_MULTIPLE (see load_config)
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 = d_model // num_heads
    d_ff: int = 0  # 0 = SwiGLU default: 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "xla", "blockwise", "cudnn", "reference"] = "auto"
    attention_block_size: int = 128  # query/key block for the blockwise implementation
    loss_chunk_size: int = 0  # >0: fused lm head + cross-entropy over this many positions at a time (no [B,T,V] logits)
    remat: Literal["none", "full", "dots"] = "none"
    # auto: the layers unrolled on CPU (a 7-10% faster step there, PERFORMANCE.md; compile time grows with depth),
    # one lax.scan over the stacked layers on accelerators (compile time independent of depth)
    scan_layers: Literal["auto", "true", "false"] = "auto"
    init_std: float = 0.02
    # Architecture variants of open models (jaxllm.convert); every default is the plain Llama above.
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2, Llama attention_bias)
    attention_out_bias: bool = False  # a bias on the output projection (Llama attention_bias)
    qk_norm: bool = False  # RMSNorm of every query/key head before the rotation (Qwen3)
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale), scales start at 0 (Gemma)
    post_norms: bool = False  # RMSNorm also on the attention and MLP outputs (Gemma 2)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    mlp_activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"  # the gate of the gated MLP
    attention_scale: float = 0.0  # attention logit scale; 0 = head_dim ** -0.5
    final_logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2)
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 0  # llama3 / yarn: the context length the model was pretrained with
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 * ln(factor) + 1
    # LoRA (jaxllm.lora): rank > 0 trains low-rank adapters only, on the frozen base of train.init_from.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: str = "q,k,v,o,gate,up,down"  # comma-separated projections that get adapters

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        return 32 * ((hidden + 31) // 32)


# Llama-style presets; the numbers are the user's dial (nanochat-style: width/depth derive the rest).
# A preset's vocab_size is its nominal size (for `jaxllm plan` and `jaxllm bench`, which have no tokenizer);
# a recipe takes the vocabulary size from its tokenizer unless it sets model.vocab_size itself.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128),
    "tiny": dict(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=256),
    "small": dict(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, max_seq_len=512),
    "25m": dict(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, max_seq_len=512),
    "125m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, max_seq_len=2048),
    "350m": dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16, num_kv_heads=8, max_seq_len=2048),
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, max_seq_len=2048,
               tie_embeddings=False),
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=11008,
               max_seq_len=4096, tie_embeddings=False),
}


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0


@dataclasses.dataclass
class DataConfig:
    # Sources: "default:<set>" (embedded data), "text:PATH", "jsonl:PATH", "tfds:NAME/CONFIG:SPLIT".
    source: str = "default:pretrain"
    eval_source: str = ""
    tokenizer: str = "default"  # "default" (embedded) or a directory holding tokenizer.model
    text_field: str = "text"
    seq_len: int = 128
    pack: bool = True
    # Pretraining: the documents packed in a row attend to each other (one BOS/EOS-separated stream, as
    # GPT-2 trains) instead of each being isolated; a document then starts in varied contexts.
    join_documents: bool = False
    sft_mode: Literal["normal", "response_only", "all_tokens"] = "normal"
    truncation: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["fail", "skip"] = "fail"
    shuffle: bool = True
    allow_change: bool = False  # resume even though the data's content changed since the checkpoint


@dataclasses.dataclass
class FeedbackConfig:
    """Preference / binary-feedback losses (DPO family, KTO) and the reward model."""

    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid = DPO
    beta: float = 0.1  # DPO/IPO/KTO temperature; ORPO's lambda; SimPO's reward scale
    margin: float = 0.0  # SimPO's target reward margin gamma
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # DPO + rpo_alpha x NLL of the chosen answer per token (RPO; TRL, Llama 3); 0 = plain DPO
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO


@dataclasses.dataclass
class RLConfig:
    """On-policy policy-gradient stage (REINFORCE/RLOO/PPO/GRPO)."""

    algorithm: str = "grpo"  # reinforce | rloo | grpo | ppo
    reward: str = "exact_match"  # a registered reward function, "reward_model", or "self_judge"
    reward_model: str = ""  # workdir of a trained reward model (reward: reward_model)
    group_size: int = 4
    prompts_per_step: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    clip_epsilon: float = 0.2
    kl_coef: float = 0.02
    updates_per_batch: int = 1
    gae_lambda: float = 0.95
    gamma: float = 1.0
    value_coef: float = 0.5
    policy_loss: str = "clipped"  # a registered policy loss (jaxllm.losses.POLICY_LOSSES)
    judge_template: str = ""  # self_judge prompt with {question} {answer} {reference}; "" = jaxllm.rl's default


@dataclasses.dataclass
class TrainConfig:
    stage: str = "pretrain"  # a registered stage: pretrain | sft | dpo | kto | reward | rl | orpo | simpo
    steps: int = 100
    batch_size: int = 16  # global, in sequences (pairs for DPO)
    grad_accum_steps: int = 1
    # CPU, model on one device: the batch's rows in this many groups whose gradients run side by side on host
    # threads (jaxllm.row_groups); 0 = one per core where the rows divide, 1 = one program
    row_groups: int = 0
    seed: int = 0
    init_from: str = ""  # workdir (or checkpoint dir) of an earlier stage: params only
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    best_metric: str = ""  # an eval metric (e.g. "loss"): also keep the best checkpoint in WORKDIR/best
    best_mode: Literal["min", "max"] = "min"
    async_checkpointing: bool = True
    z_loss: float = 0.0
    max_bad_steps_in_a_row: int = 5
    spike_factor: float = 0.0  # >0: skip updates whose loss exceeds factor x running median
    rollback_on_halt: bool = False  # at max_bad_steps_in_a_row: restore the newest checkpoint older than the bad run
    tensorboard: bool = True  # also write TensorBoard event files (tensorboardX; it imports torch when installed)
    progress: bool = True


@dataclasses.dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int = 0  # 0 = every device; N = only the first N (debugging, tests)
    distributed: bool = False  # call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    feedback: FeedbackConfig = dataclasses.field(default_factory=FeedbackConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
