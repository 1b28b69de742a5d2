"""The Colab quickstart (notebooks/quickstart.ipynb) runs top to bottom, is committed without outputs,
and uses only the package's public API."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
sys.path.insert(0, str(ROOT / "tools"))

import strip_notebook  # noqa: E402


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{NOTEBOOK}: code cells {dirty} have saved outputs or execution counts; "
                       "run `python tools/strip_notebook.py notebooks/quickstart.ipynb` before committing")
    assert strip_notebook.problems(json.loads(NOTEBOOK.read_text())) == []


def _jaxllm_private_uses(source: str) -> list[str]:
    """`_name` imported from, or read as an attribute of, anything bound from jaxllm."""
    tree = ast.parse(source)
    jaxllm_names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxllm"):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            jaxllm_names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxllm"):
                    found += [f"import {alias.name}" for part in alias.name.split(".") if part.startswith("_")]
                    jaxllm_names.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in jaxllm_names:
                found.append(f"{ast.unparse(node)}")
    return found


def test_private_use_detector_flags_private_names():
    private_import = "from jaxllm.train import _initial_params"
    assert _jaxllm_private_uses(private_import) == [private_import]
    assert _jaxllm_private_uses("from jaxllm import generate\ngenerate._generate_jit(1)") == ["generate._generate_jit"]
    assert _jaxllm_private_uses("from jaxllm import generate\nx = {}\nx._y = 1\ngenerate.generate(1)") == []


def test_notebook_uses_only_public_jaxllm_names():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(code_cells(notebook))
    assert _jaxllm_private_uses(source) == []


def test_strip_notebook_removes_outputs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    cell.execution_count = 3
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    cell.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    path = tmp_path / "dirty.ipynb"
    nbformat.write(notebook, path)
    assert strip_notebook.main(["--check", str(path)]) == 1
    assert strip_notebook.main([str(path)]) == 0
    assert strip_notebook.main(["--check", str(path)]) == 0
    cleaned = nbformat.read(path, as_version=4)
    assert [c.source for c in cleaned.cells] == [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells]
    assert all(not c.get("outputs") and c.get("execution_count") is None and "execution" not in c.metadata
               for c in cleaned.cells if c.cell_type == "code")


def _kernel_env(monkeypatch, tmp_path: Path) -> None:
    """The kernel inherits os.environ: tiny settings, one CPU device (like Colab's CPU runtime), the test
    compilation cache, a kernelspec that runs this very interpreter."""
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jaxllm test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAXLLM_QUICKSTART_STEPS", "2")
    monkeypatch.setenv("JAXLLM_QUICKSTART_PRESET", "micro")
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    monkeypatch.setenv("XLA_FLAGS", flags)
    cache = os.environ["JAXLLM_TEST_CACHE"]  # this test worker's compilation cache (conftest.py)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def test_quickstart_notebook_runs_top_to_bottom(monkeypatch, tmp_path):
    _kernel_env(monkeypatch, tmp_path)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert f"KERNEL {sys.executable}" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3, "one loss figure per stage"
    assert text.count("answers ending with EOS:") == 3  # base, SFT, DPO
    for stage in ("pretrain", "sft", "dpo"):
        assert f"{stage}: 2 steps in" in text
    assert "largest difference to the trained params: 0.0" in text
    assert "<|user|>" in text and "<|assistant|>" in text  # the chat turn, rendered
    assert (tmp_path / "quickstart_runs" / "dpo" / "config.yaml").is_file()  # written in the kernel's cwd
