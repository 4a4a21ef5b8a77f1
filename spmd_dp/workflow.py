"""The seed's workflow files: a JSON of `load` and `text_prompt` nodes with dependencies.

  python -m spmd_dp workflow=path/to/workflow.json [key=value ...]     (under torchrun too)

A workflow file has `name`, `data_dir`, `output_dir`, `prompts_dir` and `nodes`, each
`{id, type, params, dependencies}` (seed 000). A `load` node names the input
(`input_data_path`, `primary_key`; also `data_dir`, `input_format`, `storage_options`); a
`text_prompt` node is one spmd_dp job whose params are config keys (`name`, `model_name`,
`inference_engine`, `engine_options`, `batch_size`, ...). Its input is its dependency's: the load node's, or the output
of the text_prompt node it depends on (`${output_dir}/${name}.jsonl`), so one node's
output feeds the next. Text_prompt nodes run in dependency order. A single node object
(`{"id", "type": "text_prompt", "params"}`) is a workflow of that node, reading the
config's input. Precedence: the config's defaults < the workflow file < command-line overrides.
"""

from __future__ import annotations

import graphlib
import json
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spmd_dp.config import RunConfig, compose_config, load_config, resolve_and_check
from spmd_dp.errors import UsageError
from spmd_dp.output.paths import OutputPaths

NODE_TYPES = ("load", "text_prompt")
WORKFLOW_KEYS = ("data_dir", "output_dir", "prompts_dir")


def _error(path: Path, msg: str) -> UsageError:
    return UsageError(f"workflow error: {path}: {msg}")


def read_workflow(path: Path) -> Dict[str, Any]:
    try:
        wf = json.loads(path.read_text())
    except OSError as e:
        raise _error(path, f"cannot read it ({e.strerror}); give workflow=<path to a JSON file> (a relative "
                           f"path is read from the working directory)") from None
    except json.JSONDecodeError as e:
        raise _error(path, f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(wf, dict) and "type" in wf and "nodes" not in wf:  # a single node, as in seed 000's first example
        wf = {"nodes": [{**wf, "dependencies": wf.get("dependencies", [])}]}
    if not isinstance(wf, dict) or not isinstance(wf.get("nodes"), list) or not wf["nodes"]:
        raise _error(path, "a workflow is an object with a non-empty 'nodes' list (or a single node object)")
    return wf


def ordered_nodes(path: Path, wf: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Check the nodes and return them in dependency order."""
    nodes: Dict[str, Dict[str, Any]] = {}
    for i, node in enumerate(wf["nodes"]):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str):
            raise _error(path, f"node {i} needs a string 'id'")
        if node.get("type") not in NODE_TYPES:
            raise _error(path, f"node '{node['id']}' has type {node.get('type')!r}; spmd_dp runs node types "
                               f"{', '.join(NODE_TYPES)}")
        if not isinstance(node.get("params", {}), dict) or not isinstance(node.get("dependencies", []), list):
            raise _error(path, f"node '{node['id']}': 'params' must be an object and 'dependencies' a list")
        if node["id"] in nodes:
            raise _error(path, f"two nodes have the id '{node['id']}'")
        nodes[node["id"]] = node
    for nid, node in nodes.items():
        for dep in node.get("dependencies", []):
            if dep not in nodes:
                raise _error(path, f"node '{nid}' depends on '{dep}', which is not a node")
    sorter = graphlib.TopologicalSorter({nid: node.get("dependencies", []) for nid, node in nodes.items()})
    try:
        return [nodes[nid] for nid in sorter.static_order()]
    except graphlib.CycleError as e:
        raise _error(path, f"dependency cycle: {' -> '.join(reversed(e.args[1]))}") from None


def workflow_configs(path: Path, overrides: List[str], config_name: str = "config",
                     config_dir: str | None = None) -> List[RunConfig]:
    """One validated RunConfig per text_prompt node, in the order they run, on the config the command line
    names (--config-name / --config-path)."""
    wf = read_workflow(path)
    order = ordered_nodes(path, wf)
    base = _open_maps(compose_config([], config_name, config_dir))
    cli = _cli_config(overrides, config_name, config_dir)
    top = {k: wf[k] for k in WORKFLOW_KEYS if wf.get(k) is not None}
    inputs: Dict[str, Dict[str, Any]] = {}  # node id -> input keys its dependents read
    configs = []
    for node in order:
        params = dict(node.get("params", {}))
        deps = node.get("dependencies", [])
        if node["type"] == "load":
            allowed = {"input_data_path", "primary_key", "data_dir", "input_format", "storage_options"}
            unknown = sorted(set(params) - allowed)
            if unknown:
                raise _error(path, f"load node '{node['id']}' has unknown params {unknown}; allowed: {sorted(allowed)}")
            inputs[node["id"]] = params
            continue
        if len(deps) > 1:
            raise _error(path, f"text_prompt node '{node['id']}' depends on {deps}; give it one input: a load node "
                               f"or another text_prompt node")
        source = inputs.get(deps[0], {}) if deps else {}
        node_cfg = {**top, **source, **params}
        try:
            merged = OmegaConf.merge(base, node_cfg, cli)
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or ""
            raise _error(path, f"node '{node['id']}': {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
        assert isinstance(cfg, RunConfig)
        try:
            cfg = resolve_and_check(cfg)
        except UsageError as e:
            raise _error(path, f"node '{node['id']}': {str(e).removeprefix('config error: ')}") from None
        configs.append(cfg)
        # what a node depending on this one reads: this one's output
        inputs[node["id"]] = {"input_data_path": str(OutputPaths.of(cfg).output), "primary_key": cfg.primary_key,
                              "input_format": "auto"}
    if not configs:
        raise _error(path, "no text_prompt node: nothing to run")
    feeding = {d for n in order for d in n.get("dependencies", [])}
    for node, cfg in zip([n for n in order if n["type"] == "text_prompt"], configs):
        if node["id"] in feeding and cfg.output_format != "jsonl":
            raise _error(path, f"node '{node['id']}' feeds another node: its output_format must be jsonl")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise _error(path, f"text_prompt nodes must have different names (their output files): {names}")
    return configs


def _open_maps(cfg: DictConfig) -> DictConfig:
    """Let the map-valued keys (engine_options.vllm_kwargs, engine_options.lora_adapters, ...) take new keys from a
    node's params and from the command line (`+engine_options.vllm_kwargs.x=...`), as they do without a workflow;
    a key the schema does not have is still refused."""
    for key in cfg.keys():
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_maps(child)
    return cfg


def _cli_config(overrides: List[str], config_name: str, config_dir: str | None) -> DictConfig:
    """Command-line overrides as a config to merge last (checked against the schema by load_config)."""
    plain = [o for o in overrides if not o.split("=", 1)[0].lstrip("+") == "workflow"]
    load_config(plain, config_name, config_dir)  # the same checks and messages as without a workflow
    try:
        return OmegaConf.from_dotlist([o.lstrip("+") for o in plain])
    except OmegaConfBaseException as e:
        raise UsageError(f"config error: {str(e).splitlines()[0]}") from None
