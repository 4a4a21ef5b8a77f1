"""Loading the config: Hydra's compose API over the schema, the command line's overrides, unknown keys refused
(with the nearest valid one), then `resolve` (what the config names, made explicit once: relative paths from the
working directory, a JSON schema file read, OpenAI batch files keyed by custom_id) and `checks.validate`.
Every mistake is a one-line `UsageError`."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Dict, List

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from spmd_dp.config.checks import validate
from spmd_dp.config.paths import local_path, looked_in, names_a_path
from spmd_dp.config.schema import PACKAGE_DIR, RunConfig
from spmd_dp.errors import UsageError
from spmd_dp.models.embedded import is_embedded, is_embedded_adapter
from spmd_dp.redact import scrub_config

LIST_KEYS = "python -m spmd_dp --cfg job"  # prints every key and its value


def find_config_dir() -> Path:
    """`conf/` beside the package (source checkout) or inside it (wheel install)."""
    for candidate in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"config error: no config.yaml in {PACKAGE_DIR.parent / 'conf'}; reinstall spmd_dp")


def _quote_home(override: str) -> str:
    """key=~/x -> key='~/x': Hydra's override grammar takes no unquoted '~' in a value (spmd_dp expands it)."""
    key, eq, value = override.partition("=")
    if eq and value.startswith("~") and not key.startswith("~"):
        return f"{key}='{value}'"
    return override


def _short_preflight(override: str) -> str:
    """preflight=true -> preflight.enabled=true (preflight is a group: preflight.sample_records=..., ...)."""
    key, eq, value = override.partition("=")
    return f"preflight.enabled={value}" if eq and key in ("preflight", "+preflight") else override


def compose_config(overrides: List[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """Hydra composition of `<config_dir>/<config_name>.yaml` + overrides (not validated)."""
    overrides = [_quote_home(_short_preflight(o)) for o in overrides]
    cdir = Path(config_dir).resolve() if config_dir else find_config_dir()
    if not (cdir / f"{config_name}.yaml").is_file():
        raise UsageError(f"config error: no config file {cdir / (config_name + '.yaml')}; pass -cp/--config-path DIR and -cn/--config-name NAME")
    try:
        with initialize_config_dir(version_base=None, config_dir=str(cdir), job_name="spmd_dp"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(_one_line(e)) from None


def load_config(overrides: List[str], config_name: str = "config", config_dir: str | None = None) -> RunConfig:
    """The run's config: composed, unknown keys refused, resolved and checked."""
    cfg = compose_config(overrides, config_name, config_dir)
    _reject_unknown(cfg, OmegaConf.structured(RunConfig))
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UsageError(_one_line(e)) from None
    assert isinstance(run_cfg, RunConfig), type(run_cfg)
    return resolve_and_check(run_cfg)


def resolve_and_check(cfg: RunConfig) -> RunConfig:
    """`resolve`, then `validate`: the config a run uses (also each workflow node's)."""
    cfg = resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of the config with what it names made explicit, once: an OpenAI batch input is keyed by custom_id;
    structured_outputs.json given as a .json file is the schema it holds; a local model or adapter folder and the
    workflow file are absolute paths (relative ones: from the working directory, the rule of every file option,
    spmd_dp/config/paths.py)."""
    changes: Dict[str, Any] = {}
    if not is_embedded(cfg.model_name) and names_a_path(cfg.model_name):
        changes["model_name"] = str(local_path(cfg.model_name))
    adapters = {name: str(local_path(where)) if not is_embedded_adapter(where) and names_a_path(where) else where
                for name, where in cfg.engine_options.lora_adapters.items() if isinstance(where, str) and where}
    if any(adapters[n] != cfg.engine_options.lora_adapters[n] for n in adapters):
        changes["engine_options"] = dataclasses.replace(
            cfg.engine_options, lora_adapters={**cfg.engine_options.lora_adapters, **adapters})
    if cfg.workflow:
        changes["workflow"] = str(local_path(cfg.workflow))
    if cfg.input_format == "openai_batch" and cfg.primary_key == "id":
        changes["primary_key"] = "custom_id"
    so = cfg.generation_options.structured_outputs
    if isinstance(so, dict) and so:
        read = _read_schema_file(so)
        if read is not so:
            changes["generation_options"] = dataclasses.replace(cfg.generation_options, structured_outputs=read)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _read_schema_file(spec: Dict[str, Any]) -> Dict[str, Any]:
    """structured_outputs.json given as a path to a .json file: the schema it holds."""
    value = spec.get("json")
    if not (isinstance(value, str) and value.strip().endswith(".json") and not value.lstrip().startswith("{")):
        return spec
    path = local_path(value)
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"config error: generation_options.structured_outputs.json={value!r}: {path}: {e.strerror} "
                         f"({looked_in()}); give a JSON schema file that exists, or the schema itself") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"config error: generation_options.structured_outputs.json={value!r} is not JSON ({e.msg} "
                         f"at line {e.lineno}); fix the schema file") from None
    return {**spec, "json": schema}


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the key, the value and the reason."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OmegaConfBaseException) and not isinstance(e, OmegaConfBaseException):
        e = cause
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and key:
        return _unknown_key(key)
    options = getattr(e, "options", None)
    if options:  # a preset that does not exist
        what = first.split(": ", 1)[-1]
        return f"config error: {what}; available: {', '.join(options)}"
    if "Error parsing override" in text:
        return f"config error: {first}; write overrides as key=value, e.g. batch_size=64"
    override = getattr(e, "override", None)
    if override and "=" in override:  # a value with characters Hydra's grammar reserves ([ ] { } ...)
        key, _, value = override.partition("=")
        return (f"config error: cannot parse the override {override} ({first}); quote the value: "
                f"'{key}=\"{value}\"'")
    where = f"{key}: " if key else ""
    return f"config error: {where}{first}"


def _unknown_key(key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = OmegaConf.structured(RunConfig)
    for part in filter(None, parent.split(".")):
        node = node[part] if isinstance(node, DictConfig) and part in node else None
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
        return f"config error: {key} is a new key in the mapping {parent}: add it with a plus, +{key}=..."
    valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    guess = f"did you mean {parent + '.' if parent else ''}{near[0]}? " if near else ""
    return f"config error: unknown key '{key}'; {guess}every key: {LIST_KEYS}"


def _reject_unknown(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """`+key=value` appends even to a structured config; only dict-typed fields may grow."""
    for k in cfg.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            raise UsageError(_unknown_key(full))
        sub, sub_schema = cfg[k], schema[k]
        if isinstance(sub, DictConfig) and isinstance(sub_schema, DictConfig) and OmegaConf.get_type(sub_schema) is not dict:
            _reject_unknown(sub, sub_schema, full + ".")


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML, as the run writes (config.yaml) and prints it (--cfg job): secrets masked (spmd_dp/redact.py)."""
    return OmegaConf.to_yaml(OmegaConf.create(scrub_config(cfg)))
