"""The one configuration schema of mocolab: pydantic models, YAML loading and ``--set`` overrides.

Every rule that can be checked before compute is spent lives here, so that ``mocolab pretrain``,
``mocolab sweep`` (per trial) and the evaluations refuse a bad config with a message naming the
field and the fix. Paths and the tracking URI are made absolute at load (Ray Tune gives each trial
its own working directory). This module is the schema's API: its modules hold the sections
(``model``, ``data``, ``training``, ``evaluation``), the presets, the root
:class:`Config` and its cross-field rules (``schema``), and loading (``load``).
"""

from mocolab.config.base import SAFE_NAME, TIMM_PREFIX, ConfigError, flatten, is_uri, set_dotted
from mocolab.config.data import DEVICE_RECIPES, DIGIT_SIDE, LABELED_DATASETS, DataConfig, DigitsConfig
from mocolab.config.evaluation import (
    LINCLS_PROTOCOLS,
    V3_LINCLS_LR,
    DetectionConfig,
    DetectionDataConfig,
    EvalConfig,
    LinclsConfig,
    resolve_lincls,
)
from mocolab.config.load import (
    absolute_tracking_uri,
    build_config,
    default_tracking_uri,
    format_validation_error,
    load_config,
    new_run_name,
    parse_override,
    read_yaml,
)
from mocolab.config.model import BUILTIN_ARCHS, MocoConfig, ModelConfig
from mocolab.config.presets import PRESETS, STEP_MILESTONE_FRACTIONS, V3_ARCH_PRESETS, apply_preset
from mocolab.config.schema import Config, check_labeled, check_run_rules, check_timm_arch, follow_run_seed
from mocolab.config.training import ScalingConfig, TrackingConfig, TrainConfig

__all__ = [
    "BUILTIN_ARCHS",
    "DEVICE_RECIPES",
    "DIGIT_SIDE",
    "LABELED_DATASETS",
    "LINCLS_PROTOCOLS",
    "PRESETS",
    "SAFE_NAME",
    "STEP_MILESTONE_FRACTIONS",
    "TIMM_PREFIX",
    "V3_ARCH_PRESETS",
    "V3_LINCLS_LR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DetectionConfig",
    "DetectionDataConfig",
    "DigitsConfig",
    "EvalConfig",
    "LinclsConfig",
    "ModelConfig",
    "MocoConfig",
    "ScalingConfig",
    "TrackingConfig",
    "TrainConfig",
    "absolute_tracking_uri",
    "apply_preset",
    "build_config",
    "check_labeled",
    "check_run_rules",
    "check_timm_arch",
    "default_tracking_uri",
    "flatten",
    "follow_run_seed",
    "format_validation_error",
    "is_uri",
    "load_config",
    "new_run_name",
    "parse_override",
    "read_yaml",
    "resolve_lincls",
    "set_dotted",
]
