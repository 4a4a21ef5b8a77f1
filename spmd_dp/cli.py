"""The command line: `python -m spmd_dp [options] [key=value ...]` (also under torchrun or srun).

Options: `--cfg job` prints the resolved config and exits; `-cn/--config-name`
and `-cp/--config-path` pick another YAML file (Hydra's flags); everything else
is a Hydra override. Exit codes: 0 success, 2 bad config/input/environment
(one line on stderr, before a model loads), 1 any other failure, 128 + N after a
drain on signal N (SIGTERM: 143; Ctrl-C: 130), what finished being committed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from spmd_dp.config import load_config, to_yaml
from spmd_dp.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Drained, RunFailure, UsageError
from spmd_dp.launch.torchrun import EXIT_DIR_VAR, write_exit_code
from spmd_dp.log import logger, setup_logging
from spmd_dp.redact import remember, text as redact_text

USAGE = """usage: torchrun --nproc-per-node=N -m spmd_dp [--cfg job] [-cn NAME] [-cp DIR] [key=value ...]
       python -m spmd_dp [...]                      (one process)

Runs vLLM offline batch inference over ${data_dir}/${input_data_path} on every rank
and writes ${output_dir}/${name}.jsonl. Overrides are Hydra's: batch_size=64,
engine_options.gpus_per_dp_rank=2, +engine_options.vllm_kwargs.enforce_eager=true.
  --cfg job          print the resolved config and exit
  -cn, --config-name NAME   use conf/NAME.yaml (default: config)
  -cp, --config-path DIR    look for the config in DIR (default: the conf/ of spmd_dp)
"""


def _parse(argv: Sequence[str]) -> tuple[List[str], Optional[str], str, Optional[str]]:
    overrides: List[str] = []
    cfg_what, name, path = None, "config", None
    it = iter(argv)
    for arg in it:
        flag, eq, val = arg.partition("=")
        if arg in ("-h", "--help"):
            raise SystemExit(print(USAGE) or EXIT_OK)
        if flag in ("--cfg", "-c", "--config-name", "-cn", "--config-path", "-cp"):
            value = val if eq else next(it, None)
            if value is None:
                raise UsageError(f"usage error: {flag} needs a value; see --help")
            if flag in ("--cfg", "-c"):
                if value != "job":
                    raise UsageError(f"usage error: --cfg {value}: only --cfg job is supported")
                cfg_what = value
            elif flag in ("--config-name", "-cn"):
                name = value.removesuffix(".yaml")
            else:
                path = value
        elif arg.startswith("-"):
            raise UsageError(f"usage error: unknown option {arg}; options are --cfg job, -cn NAME, -cp DIR "
                             f"(config values are key=value overrides)")
        else:
            overrides.append(arg)
    return overrides, cfg_what, name, path


def _report_to_torchrun(error_file: Optional[str], message: str) -> None:
    """torchrun's failure summary shows the error file of a failed rank: give it our one line."""
    if error_file and not os.path.exists(error_file):
        with open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # read now: the run scrubs torchrun's variables
    exit_dir, rank = os.environ.get(EXIT_DIR_VAR), os.environ.get("RANK")
    code, message = _main(argv)
    if code != EXIT_OK and code < 128 and message:
        _report_to_torchrun(error_file, message)
    write_exit_code(exit_dir, rank, code)  # for spmd_dp.launch.torchrun (the launch scripts): torchrun exits 1
    return code


def _main(argv: Optional[Sequence[str]]) -> tuple[int, str]:
    try:
        overrides, cfg_what, name, path = _parse(sys.argv[1:] if argv is None else argv)
        cfg = load_config(overrides, config_name=name, config_dir=path)
        remember(cfg)  # its secrets are masked in every line from now on
        cfgs = [cfg]
        if cfg.workflow:
            from spmd_dp.workflow import workflow_configs

            cfgs = workflow_configs(Path(cfg.workflow), overrides, name, path)
            for c in cfgs:
                remember(c)
        if cfg_what == "job":
            print("\n---\n".join(to_yaml(c) for c in cfgs), end="")
            return EXIT_OK, ""
        from spmd_dp.run import run  # torch is imported only for a real run

        return run(cfgs), ""
    except UsageError as e:
        if e.quiet:
            return EXIT_USAGE, redact_text(f"spmd_dp: {e}")
        message, code = f"spmd_dp: {e}", EXIT_USAGE
    except RunFailure as e:
        logger.error("%s", e)
        message, code = f"spmd_dp: error: {e}", EXIT_FAILURE
    except Drained as e:
        message, code = f"spmd_dp: {e}", e.code
    except KeyboardInterrupt:
        message, code = "spmd_dp: interrupted; rerun with the same output_dir to resume", 130
    except Exception as e:  # a bug or an engine crash: keep the traceback for the report
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        message, code = f"spmd_dp: error: {type(e).__name__}: {e}", EXIT_FAILURE
    message = redact_text(message)
    if message:
        print(message, file=sys.stderr, flush=True)
    return code, message
