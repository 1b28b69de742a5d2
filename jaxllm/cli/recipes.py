"""`jaxllm recipes`: the recipes shipped with jaxllm (JAX-free, so it answers at once)."""

from __future__ import annotations

import argparse

from jaxllm.config import builtin_recipes, recipe_summary


def recipes_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm recipes",
                                     description="List the recipes shipped with jaxllm (usable by name from any "
                                                 "directory: `jaxllm train pretrain_tiny --workdir runs/pt`).")
    parser.add_argument("--path", action="store_true", help="also print each recipe's file")
    args = parser.parse_args(argv)
    recipes = builtin_recipes()
    width = max((len(name) for name in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}" + (f"  [{path}]" if args.path else ""))
    return 0
