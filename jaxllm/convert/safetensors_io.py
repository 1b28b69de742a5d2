"""safetensors files, read and written with the `safetensors` library (the `hf` extra): numpy arrays,
bfloat16 as ml_dtypes.bfloat16, one tensor at a time from a memory-mapped file; `HFWeights` reads a
Hugging Face folder's (possibly sharded) weights by name."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxllm.config import ConfigError

_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
           "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


def _safetensors():
    """The `safetensors` package, imported on first use: only HF conversion needs it (`pip install jaxllm[hf]`)."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ConfigError("reading and writing Hugging Face checkpoints needs the safetensors package: "
                          "pip install 'jaxllm[hf]'") from None
    return safetensors


class SafetensorsFile:
    """A memory-mapped .safetensors file: `names`, `metadata`, `shape(name)`, `dtype(name)`, `read(name)`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = _safetensors().safe_open(str(path), framework="numpy")
        except Exception as error:  # noqa: BLE001 - the library's error types differ between versions
            raise ConfigError(f"{path} is not a readable safetensors file ({str(error).strip()[:200]})") from None
        self.metadata = self._file.metadata() or {}

    @property
    def names(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        code = self._file.get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise ConfigError(f"{self.path}: tensor {name} has dtype {code}, which jaxllm cannot read "
                              f"(supported: {', '.join(_DTYPES)}); quantized checkpoints are not supported")
        return _DTYPES[code]

    def read(self, name: str) -> np.ndarray:
        self.dtype(name)  # an unsupported dtype is a clear error, not the library's
        return self._file.get_tensor(name)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays) as one .safetensors file."""
    supported = set(_DTYPES.values())
    for name, array in tensors.items():
        if array.dtype not in supported:
            raise ConfigError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
    _safetensors().numpy.save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(path),
                                   metadata=dict(metadata or {"format": "pt"}))


class HFWeights:
    """All tensors of a Hugging Face model folder (model.safetensors or the sharded index), by name."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        else:
            paths = sorted(directory.glob("*.safetensors"))
            if not paths:
                others = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
                hint = (f" (found {', '.join(others[:3])}: re-save the model with "
                        "`model.save_pretrained(dir, safe_serialization=True)`)") if others else ""
                raise ConfigError(f"{directory} has no *.safetensors weights{hint}")
            files = {}
            for path in paths:
                for name in SafetensorsFile(path).names:
                    files[name] = path
        self._files = files
        self._open: dict[Path, SafetensorsFile] = {}
        names = set(files)
        # A bare `LlamaModel` save has no "model." prefix.
        self.prefix = "model." if any(n.startswith("model.") for n in names) else ""

    @property
    def names(self) -> set[str]:
        return set(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise ConfigError(f"the checkpoint has no tensor '{name}', which this model config needs")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path].read(name)

    def dtype(self, name: str) -> np.dtype:
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path].dtype(name)
