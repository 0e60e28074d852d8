"""The run configuration (one YAML file per run), validated when it is loaded.

`pipelines/config/run.py` holds `RunConfig`, the data stages' and serving sections and the
loader; `pipelines/config/learning.py` the learning stages' sections. Import from here.
"""
from pipelines.config.learning import (AblationConfig, BenchmarkConfig, EvaluateConfig, LoraSettings,
                                       OnlineConfig, QualityFilterConfig, RewardModelConfig, RewardsConfig,
                                       RewritesConfig, TrainConfig)
from pipelines.config.run import (AutoscalingConfig, ChatAppConfig, ChatLogConfig, ConfigError, Filters,
                                  FollowupsConfig, IngestConfig, InputFormat, ModelsConfig, PersonasConfig,
                                  ResourcesConfig, RewardAppConfig, RunConfig, ServeAppConfig, ServeConfig,
                                  UserKey, load_config, parse_config)

__all__ = [
    "AblationConfig", "AutoscalingConfig", "BenchmarkConfig", "ChatAppConfig", "ChatLogConfig", "ConfigError",
    "EvaluateConfig", "Filters", "FollowupsConfig", "IngestConfig", "InputFormat", "LoraSettings", "ModelsConfig",
    "OnlineConfig", "PersonasConfig", "QualityFilterConfig", "ResourcesConfig", "RewardAppConfig",
    "RewardModelConfig", "RewardsConfig", "RewritesConfig", "RunConfig", "ServeAppConfig", "ServeConfig",
    "TrainConfig", "UserKey", "load_config", "parse_config",
]
