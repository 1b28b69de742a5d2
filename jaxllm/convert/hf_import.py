"""`jaxllm convert from-hf`: a Hugging Face folder (config.json, *.safetensors, tokenizer files) -> a jaxllm
workdir, leaf by leaf placed on the devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig, save_config, to_dict
from jaxllm.convert.hf_config import model_config_from_hf
from jaxllm.convert.safetensors_io import HFWeights
from jaxllm.convert.tensor_map import leaf_paths, tensor_map, tree_get, tree_set
from jaxllm.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from jaxllm.data.tokenizer import check_vocab

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "added_tokens.json")
SOURCE_FILE = "hf_source.json"


def _conversion_mesh(fsdp: int) -> jax.sharding.Mesh:
    return sharding_lib.make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1, num_devices=fsdp))


def load_hf_params(hf_dir: str | Path, model: ModelConfig, family: str, mesh: jax.sharding.Mesh | None = None,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The jaxllm params of a Hugging Face folder, leaf by leaf (each assembled on the host, placed on the
    mesh sharded by its logical axes, then freed). Raises ConfigError on missing or unexpected tensors."""
    weights = HFWeights(Path(hf_dir))
    _, abstract = model_lib.abstract_model(model)
    mesh = mesh or _conversion_mesh(1)
    shardings = sharding_lib.tree_shardings(abstract, model_lib.logical_axes(model), mesh)
    entries = tensor_map(model, family, weights.prefix)
    expected_paths = set(leaf_paths(abstract))
    mapped = {entry.path for entry in entries}
    if expected_paths != mapped:  # the map and the model must describe the same leaves
        raise ConfigError(f"internal: tensor map and model differ: {sorted(expected_paths ^ mapped)}")
    used: set[str] = set()
    dtype = np.dtype(jax.numpy.dtype(model.param_dtype))
    params: dict[str, Any] = {}
    for entry in entries:
        target = tree_get(abstract, entry.path)
        if entry.layered:
            host = np.empty(target.shape, dtype)
            for i in range(model.num_layers):
                name = entry.hf_name.format(i=i)
                host[i] = entry.to_jax(weights.read(name)).astype(dtype)
                used.add(name)
        else:
            host = np.ascontiguousarray(entry.to_jax(weights.read(entry.hf_name)).astype(dtype))
            used.add(entry.hf_name)
        if host.shape != target.shape:
            raise ConfigError(f"tensor for {'/'.join(entry.path)} has shape {host.shape} after conversion, the "
                              f"model config expects {target.shape}; config.json and the weights disagree")
        tree_set(params, entry.path, jax.device_put(host, tree_get(shardings, entry.path)))
        del host
    leftover = sorted(name for name in weights.names - used
                      if not (model.tie_embeddings and name == "lm_head.weight")
                      and not name.endswith("rotary_emb.inv_freq"))
    if leftover:
        shown = ", ".join(leftover[:8]) + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
        raise ConfigError(f"{hf_dir}: {len(leftover)} tensors have no place in the converted model ({shown}); "
                          "the checkpoint has parts jaxllm's model does not support")
    log(f"converted {len(used)} tensors into {len(entries)} jaxllm parameters")
    return params


def copy_tokenizer_files(hf_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
            copied.append(name)
    return copied


def write_workdir(out: str | Path, config: Config, params: dict[str, Any], meta: dict[str, Any]) -> Path:
    """A workdir holding `params` as step 0 (Orbax; params only) and `config.yaml`."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if ckpt.latest_step(out) is not None:
        raise ConfigError(f"{out} already holds a checkpoint; choose an empty --out directory")
    save_config(config, out / "config.yaml")
    manager = ckpt.make_manager(out, keep=1, async_save=False)
    ckpt.save(manager, 0, {"step": np.zeros((), np.int32), "params": params}, {},
              {"step": 0, "stage": "converted", "config": to_dict(config), **meta}, force=True)
    manager.wait_until_finished()
    manager.close()
    return out


def from_hf(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None, fsdp: int = 1,
            log: Callable[[str], None] = print) -> Path:
    """Converts a Hugging Face model folder into a jaxllm workdir; returns the workdir."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{hf_dir} has no config.json; point from-hf at a Hugging Face model folder "
                          "(config.json + *.safetensors)")
    hf = json.loads(config_file.read_text())
    conversion = model_config_from_hf(hf, dtype)
    for note in conversion.notes:
        log(f"note: {note}")

    tokenizer = HFTokenizer.load(hf_dir) if is_hf_tokenizer_dir(hf_dir) else None
    if tokenizer is not None:  # before any work: ids past the embedding table would be silently wrong
        check_vocab(tokenizer, conversion.model.vocab_size)
    params = load_hf_params(hf_dir, conversion.model, conversion.family, _conversion_mesh(fsdp), log)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_tokenizer_files(hf_dir, out)
    config = Config(model=conversion.model)
    config.data.seq_len = min(config.data.seq_len, conversion.model.max_seq_len)
    if tokenizer is not None:
        config.data.tokenizer = str(out)
    else:
        log("note: the folder has no tokenizer.json or tokenizer.model; set data.tokenizer when training on it")
    source = {"family": conversion.family, "source": str(hf_dir.absolute()), "architectures": hf.get("architectures"),
              "special_ids": conversion.special_ids, "tokenizer_files": copied, "notes": conversion.notes}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    meta: dict[str, Any] = {"hf_source": source}
    if tokenizer is not None:
        meta["tokenizer_fingerprint"] = HFTokenizer.load(out).fingerprint
    write_workdir(out, config, params, meta)
    log(f"wrote {out}: {conversion.family} model, {sum(x.size for x in jax.tree.leaves(params)):,} parameters "
        f"({conversion.model.param_dtype}), tokenizer files: {', '.join(copied) or 'none'}")
    return out
