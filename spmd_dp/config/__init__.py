"""The run's configuration: the schema (schema.py), loading it with Hydra (load.py), checking it (checks.py)."""

from spmd_dp.config.checks import LORA_PROMPT_LOGPROBS, structured_outputs_problem, validate
from spmd_dp.config.load import compose_config, load_config, resolve_and_check, to_yaml
from spmd_dp.config.schema import EngineOptions, GenerationOptions, RunConfig, task_list

__all__ = ["EngineOptions", "GenerationOptions", "LORA_PROMPT_LOGPROBS", "RunConfig", "compose_config", "load_config",
           "resolve_and_check", "structured_outputs_problem", "task_list", "to_yaml", "validate"]
