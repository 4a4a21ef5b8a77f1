"""Can `model_name` (and each LoRA adapter) be started, and can the model serve the run's tasks? Decided on every rank
before anything starts, in seconds: exit 2 with one line naming the model and the fix, instead of an engine that
fails after a long start or after the Hub's retries.

  an embedded name (spmd-dp/...)  one of the list (the nearest one named);
  a local folder                  a name written as a path (/, ./, ../, ~) or an existing folder must exist;
                                  a relative one is read from the working directory (spmd_dp/config/paths.py);
  a hub id                        found in the local Hugging Face cache; if not there, with HF_HUB_OFFLINE=1 that is
                                  the error; else the Hub is asked once (no retries): unknown, gated, unreachable;
  the task                        from the model's config.json (or the embedded model's spec): a sequence classifier
                                  cannot generate, and scores (as a cross-encoder) only with one label; a causal LM
                                  has no trained classification head for classify or reward (vLLM 0.32 runs it
                                  with an untrained one: measured, 2 records gave [1.0, 0.0] and [0.0, 1.0]).

What a reader would get wrong: nothing here starts vLLM or downloads weights, and what cannot be known (a hub
model's config when the Hub answers without it, a Hub error other than unknown/gated/unreachable) is left to vLLM.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from spmd_dp.config import RunConfig, task_list
from spmd_dp.config.paths import local_path, looked_in, names_a_path
from spmd_dp.errors import UsageError
from spmd_dp.models.embedded import EMBEDDED_ADAPTERS, EMBEDDED_MODELS, head_config

EMBEDDED_PREFIX = "spmd-dp/"
HUB_TIMEOUT_S = 10.0  # one request to the Hub, when the model is not in the local cache


def check_model(cfg: RunConfig) -> None:
    """Checks on the local machine that need no process group (every rank runs them); raises UsageError."""
    if cfg.inference_engine != "vllm_dp":
        return  # the echo engine loads no model
    revision = cfg.engine_options.vllm_kwargs.get("revision")
    config = model_config(cfg.model_name, "model_name", revision=revision)
    for name, where in cfg.engine_options.lora_adapters.items():
        model_config(where, f"engine_options.lora_adapters.{name}", adapter=True)
    overrides = cfg.engine_options.vllm_kwargs.get("hf_overrides")  # vLLM changes the config with these
    if config is not None and isinstance(overrides or {}, dict):
        check_tasks(cfg.model_name, {**config, **(overrides or {})}, task_list(cfg.task))


def model_config(name: str, key: str, adapter: bool = False, revision: Optional[str] = None
                 ) -> Optional[Dict[str, Any]]:
    """The config.json of the model `name` (key: the config key that named it), or None where it cannot be read
    before the engine starts; raises UsageError when `name` cannot be started at all."""
    what = "adapter_config.json" if adapter else "config.json"
    if name.startswith(EMBEDDED_PREFIX):
        return _embedded(name, key, adapter)
    if names_a_path(name):
        path = local_path(name)
        if not path.exists():
            where = "" if str(path) == name else f": {path}"  # (resolve made it absolute already)
            raise UsageError(f"config error: {key}={name!r}{where} does not exist (a relative path is read from the "
                             f"working directory {Path.cwd()}); give an existing {'adapter' if adapter else 'model'} "
                             f"folder or a Hugging Face hub id")
        return _read_json(path / what) if path.is_dir() else None
    return _hub(name, key, what, revision)


def _embedded(name: str, key: str, adapter: bool) -> Optional[Dict[str, Any]]:
    known = EMBEDDED_ADAPTERS if adapter else EMBEDDED_MODELS
    if name in known:
        return None if adapter else head_config(EMBEDDED_MODELS[name])
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    raise UsageError(f"config error: {key}={name!r} is not an embedded {'adapter' if adapter else 'model'}; "
                     f"{hint}the embedded ones: {', '.join(known)}")


def _hub(name: str, key: str, what: str, revision: Optional[str]) -> Optional[Dict[str, Any]]:
    """A hub id: from the local cache at once; else (online) one question to the Hub."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(f"config error: {key}={name!r} is neither a folder ({looked_in()}) nor a Hugging Face hub "
                         f"id (org/name); give an existing folder or a hub id") from None
    cached = try_to_load_from_cache(name, what, revision=revision)
    if isinstance(cached, str):
        return _read_json(Path(cached))
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"config error: {key}={name!r} is not in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 allows no download; download it first "
                         f"(huggingface-cli download {name}), or give a local folder")
    try:
        info = HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UsageError(f"config error: {key}={name!r} is a gated model: accept its terms on "
                         f"https://huggingface.co/{name} and set HF_TOKEN (or run huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise UsageError(f"config error: {key}={name!r} is not a model on the Hugging Face Hub, nor a folder "
                         f"({looked_in()}); check the name (a private model needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UsageError(f"config error: {key}={name!r} has no revision {revision!r} on the Hugging Face Hub; "
                         f"check engine_options.vllm_kwargs.revision") from None
    except HfHubHTTPError:
        return None  # the Hub answered with another error (busy, rate limited): vLLM tries again
    except Exception as e:  # no network, no DNS, a proxy, a timeout: whatever the HTTP client raises
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"config error: {key}={name!r} is not in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and the Hub cannot be reached ({reason}); download it where "
                         f"there is network (huggingface-cli download {name}), or give a local folder") from None
    return info.config if isinstance(getattr(info, "config", None), dict) else None


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # vLLM says what is wrong with the folder
    return data if isinstance(data, dict) else None


def num_labels(config: Dict[str, Any]) -> int:
    """The labels of a classifier's head, as transformers counts them (id2label, else num_labels, else 2); a causal
    LM made a reranker (classifier_from_token, vLLM's method from_2_way_softmax) as vLLM counts them."""
    tokens, method = config.get("classifier_from_token"), config.get("method")
    if tokens and method:
        return 1 if method == "from_2_way_softmax" else len(tokens)
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def check_tasks(name: str, config: Dict[str, Any], tasks: List[str]) -> None:
    """Can the model of this config.json serve every task of the run? Raises UsageError naming the fix."""
    archs = [str(a) for a in config.get("architectures") or []]
    if not archs:
        return
    arch = archs[0]
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    causal_lm = all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if classifier and "generate" in tasks:
        raise UsageError(f"config error: task=generate: model_name={name!r} is a sequence classifier ({arch}): it "
                         f"cannot generate text; use task=classify, reward or score with it, or a generative model")
    head = classifier or "classifier_from_token" in config
    for task in ("classify", "reward"):
        if task in tasks and causal_lm and not head:
            raise UsageError(f"config error: task={task}: model_name={name!r} is a causal LM ({arch}) with no "
                             f"classification head (vLLM would add an untrained one: its scores would mean nothing); "
                             f"use a sequence classifier (...ForSequenceClassification, e.g. "
                             f"spmd-dp/tiny-llama-classifier), or task=embed with this model")
    if "score" in tasks and head and num_labels(config) != 1:
        n = num_labels(config)
        raise UsageError(f"config error: task=score: model_name={name!r} is a sequence classifier with {n} labels; "
                         f"scoring a pair with a classifier (a cross-encoder) needs one label: use a 1-label model "
                         f"(spmd-dp/tiny-llama-reward, a reranker such as BAAI/bge-reranker-v2-m3), or task=classify "
                         f"for its {n} class probabilities")
