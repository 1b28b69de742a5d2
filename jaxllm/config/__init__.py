"""Typed configuration: small nested dataclasses, YAML recipes, `key.sub=value` overrides.

A recipe is a YAML file whose keys mirror `Config`. Unknown keys and wrong types are errors that
name the key (and the closest valid one). Model sizes come from presets (`model.preset: tiny`)
whose fields any explicit key overrides.

    schema.py   the dataclasses (Config and one per section) and MODEL_PRESETS
    loading.py  load_config (recipe + dict + overrides), from_dict / to_dict, save_config
    recipes.py  the built-in recipes shipped in the package
    checks.py   ranges of every setting, cross-field validation
    resume.py   which config changes a resumed run refuses, warns about or ignores
"""

from __future__ import annotations

from jaxllm.config.checks import FLOAT_RANGES, INT_MINIMUMS, check_ranges, iter_settings, validate
from jaxllm.config.loading import (VOCAB_MULTIPLE, config_json, from_dict, load_config, parse_override, save_config,
                                   to_dict, vocab_size_for)
from jaxllm.config.recipes import (RECIPE_DIRECTORY, RECIPE_PACKAGE, builtin_recipe_dir, builtin_recipes,
                                   recipe_summary, resolve_recipe)
from jaxllm.config.resume import (RESUME_FREE_KEYS, RESUME_FREE_SECTIONS, RESUME_INCOMPATIBLE_KEYS,
                                  RESUME_INCOMPATIBLE_SECTIONS, SCHEDULE_KEYS, ConfigChanges, compare_for_resume)
from jaxllm.config.schema import (MODEL_PRESETS, Config, DataConfig, FeedbackConfig, MeshConfig, ModelConfig,
                                  OptimizerConfig, RLConfig, TrainConfig)
from jaxllm.errors import ConfigError

__all__ = [
    "Config", "ModelConfig", "OptimizerConfig", "DataConfig", "FeedbackConfig", "RLConfig", "TrainConfig",
    "MeshConfig", "ConfigError", "MODEL_PRESETS", "load_config", "from_dict", "to_dict", "save_config",
    "parse_override", "validate", "resolve_recipe", "builtin_recipes", "recipe_summary", "vocab_size_for",
    "check_ranges", "compare_for_resume", "ConfigChanges",
]
