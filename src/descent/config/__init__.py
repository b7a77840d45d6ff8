"""config/: the composed config checked before anything is built: rules, the schema read from conf/, checks across keys, sweeps' and studies' pre-checks, the resume policy, conf/'s resolvers."""

from descent.config.checks import LR_TAG, lr_not_searched, validate
from descent.config.resolvers import register
from descent.config.resume import RESUME_MAY_CHANGE, resume_config
from descent.config.rules import ConfigError
from descent.config.schema import OBJECTIVES
from descent.config.sweeps import validate_sweep

__all__ = ["LR_TAG", "OBJECTIVES", "RESUME_MAY_CHANGE", "ConfigError", "lr_not_searched", "register", "resume_config",
           "validate", "validate_sweep"]
