"""Built-in recipes: the YAML files shipped in the package (jaxllm/recipes; `configs/` in the checkout)."""

from __future__ import annotations

from pathlib import Path

from jaxllm import settings
from jaxllm.errors import ConfigError

RECIPE_PACKAGE = "jaxllm"
RECIPE_DIRECTORY = "recipes"


def builtin_recipe_dir() -> Path:
    """The directory of the recipes shipped with the package (a real directory in a wheel or a checkout)."""
    from importlib import resources

    return Path(str(resources.files(RECIPE_PACKAGE).joinpath(RECIPE_DIRECTORY)))


def builtin_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> file, for every YAML recipe shipped with the package."""
    directory = builtin_recipe_dir()
    if not directory.is_dir():
        return {}
    return {path.stem: path for path in sorted(directory.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's leading comment block (its one-line description), or ""."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text or text.startswith(("jaxllm ", "`jaxllm")):
            break
        words.append(text)
    summary = " ".join(words)
    end = summary.find(". ")
    return (summary[:end + 1] if end >= 0 else summary).rstrip(":")


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path as given when it exists, else the built-in recipe of that name.

    `pretrain_tiny`, `pretrain_tiny.yaml` and `configs/pretrain_tiny.yaml` all name the built-in recipe, so
    the README's commands work from any directory after `pip install`; an existing file always wins."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = builtin_recipes()
    stem = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.suffix in ("", ".yaml") and path.parent in (Path("."), Path("configs")) and stem in builtin:
        return builtin[stem]
    names = ", ".join(builtin) or "none installed"
    raise ConfigError(f"recipe file {name_or_path} does not exist and is not a built-in recipe"
                      f"{settings.closest(stem, list(builtin))}; "
                      f"built-in recipes: {names} (`jaxllm recipes` describes them)")
