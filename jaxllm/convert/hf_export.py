"""`jaxllm convert to-hf` (a workdir -> config.json + sharded model.safetensors + tokenizer files) and
`jaxllm convert merge-lora` (LoRA adapters merged into their base -> a plain workdir)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm import lora
from jaxllm import model as model_lib
from jaxllm.config import Config, ConfigError, load_config
from jaxllm.convert.hf_config import hf_config_from_model, infer_family
from jaxllm.convert.hf_import import SOURCE_FILE, TOKENIZER_FILES, copy_tokenizer_files, write_workdir
from jaxllm.convert.safetensors_io import write_safetensors
from jaxllm.convert.tensor_map import tensor_map, tree_get
from jaxllm.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from jaxllm.lora import _resolve


def load_workdir_params(workdir: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, params) of a workdir on one device; LoRA adapters are merged into their base (the
    returned config then has lora_rank=0). Reward/value heads are dropped."""
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise ConfigError(f"{workdir} is not a jaxllm workdir (no config.yaml)")
    config = load_config(workdir / "config.yaml")
    base_model = dataclasses.replace(config.model, lora_rank=0)
    _, abstract = model_lib.abstract_model(base_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params = lora.load_params(workdir, target)
    config.model = base_model
    return config, params


def to_hf(workdir: str | Path, out: str | Path, *, family: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 2**30, log: Callable[[str], None] = print) -> Path:
    """Writes a workdir as a Hugging Face folder (config.json, safetensors, tokenizer files)."""
    workdir, out = Path(workdir), Path(out)
    config, params = load_workdir_params(workdir)
    chain = [workdir, *_init_chain(workdir)]
    source_dir = next((d for d in chain if (d / SOURCE_FILE).is_file()), None)
    source = json.loads((source_dir / SOURCE_FILE).read_text()) if source_dir else {}
    tokenizer_dir = next((d for d in chain if any((d / n).is_file() for n in TOKENIZER_FILES)), None)
    family = family or source.get("family") or infer_family(config.model)
    dtype = dtype or config.model.param_dtype
    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}.get(dtype)
    if np_dtype is None:
        raise ConfigError(f"--dtype {dtype} must be float32, bfloat16 or float16")
    hf_config = hf_config_from_model(config.model, family, source.get("special_ids"), dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    entries = tensor_map(config.model, family)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for entry in entries:
            value = np.asarray(jax.device_get(tree_get(params, entry.path)))
            if entry.layered:
                for i in range(config.model.num_layers):
                    yield entry.hf_name.format(i=i), np.ascontiguousarray(entry.to_hf(value[i]).astype(np_dtype))
            else:
                yield entry.hf_name, np.ascontiguousarray(entry.to_hf(value).astype(np_dtype))

    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        if not shards[-1]:
            return
        files.append(f"shard-{len(files):05d}")
        path = out / (files[-1] + ".safetensors")
        write_safetensors(path, shards[-1])
        for name in shards[-1]:
            weight_map[name] = path.name
        shards[-1] = {}
        sizes[-1] = 0

    for name, array in tensors():
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = array
        sizes[-1] += array.nbytes
        total += array.nbytes
    flush()
    if len(files) == 1:
        (out / (files[0] + ".safetensors")).rename(out / "model.safetensors")
    else:
        count = len(files)
        renamed = {}
        for number, stem in enumerate(files, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (out / (stem + ".safetensors")).rename(out / final)
            renamed[stem + ".safetensors"] = final
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: renamed[file] for name, file in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copied = copy_tokenizer_files(tokenizer_dir, out) if tokenizer_dir is not None else []
    log(f"wrote {out}: {family} model ({dtype}), {len(files)} safetensors file(s), "
        f"tokenizer files: {', '.join(copied) or 'none'}")
    return out


def merge_lora(workdir: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """A LoRA workdir -> a plain workdir with the adapters merged into the base weights (and the tokenizer
    files of the nearest run in its init_from chain that has them)."""
    config, params = load_workdir_params(workdir)
    config.train.init_from = ""
    out = Path(out).absolute()
    if ckpt.latest_step(out) is not None:
        raise ConfigError(f"{out} already holds a checkpoint; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"merged_from": str(Path(workdir).absolute())}
    for directory in (Path(workdir), *_init_chain(Path(workdir))):
        if not copy_tokenizer_files(directory, out):
            continue
        if (directory / SOURCE_FILE).is_file():
            shutil.copyfile(directory / SOURCE_FILE, out / SOURCE_FILE)
        if config.data.tokenizer == str(directory.absolute()) and is_hf_tokenizer_dir(out):
            config.data.tokenizer = str(out)
            meta["tokenizer_fingerprint"] = HFTokenizer.load(out).fingerprint
        break
    write_workdir(out, config, params, meta)
    log(f"wrote {out}: adapters of {workdir} merged into their base")
    return out


def _init_chain(workdir: Path) -> list[Path]:
    chain, current = [], workdir
    while (current / "config.yaml").is_file():
        parent = load_config(current / "config.yaml").train.init_from
        if not parent:
            break

        current = _resolve(current.absolute(), parent)
        chain.append(current)
    return chain
