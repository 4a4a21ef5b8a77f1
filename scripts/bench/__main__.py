"""The benchmarks' one command line: `python -m scripts.bench <subcommand> --help` (from the repository root)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.bench import __doc__ as OVERVIEW
from scripts.bench.common import SUITES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=OVERVIEW,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    from scripts.bench import suite
    s = sub.add_parser("suite", help="the throughput suite: raw vLLM, the DP example, spmd_dp static and dynamic",
                       description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("suite", choices=list(SUITES))
    s.add_argument("--out", required=True)
    s.add_argument("--phases", help="comma-separated phases (default: all, then echo); see suite.phases()")
    s.add_argument("--prompts", type=int, help="records per workload (default: the suite's)")
    s.add_argument("--echo-records", type=int, default=1_000_000, help="records of the echo memory run")
    s.set_defaults(handler=suite.run_suite)

    s = sub.add_parser("raw", help="(internal) one raw vLLM process over a share of a workload")
    for a in ("--workload", "--result", "--engine-kwargs"):
        s.add_argument(a, required=True)
    for a in ("--start", "--stop", "--max-tokens"):
        s.add_argument(a, type=int, required=True)
    s.set_defaults(handler=suite.raw_main)

    from scripts.bench import report
    s = sub.add_parser("report", help="merge phase results (DIR/phase-*.json) into one report",
                       description=report.__doc__)
    s.add_argument("--out", required=True)
    s.add_argument("inputs", nargs="+", help="folders of phase-*.json")
    s.set_defaults(handler=lambda a: report.report(Path(a.out), [Path(x) for x in a.inputs]))

    from scripts.bench import scan
    s = sub.add_parser("scan", help="the input scan: shared by the ranks vs today's (rank 0 alone)",
                       description=scan.__doc__)
    s.add_argument("--out", required=True)
    s.add_argument("--records", default="1000000", help="comma-separated sizes, e.g. 1000000,10000000")
    s.add_argument("--record-bytes", type=int, default=200)
    s.add_argument("--shards", type=int, default=16)
    s.add_argument("--ranks", default="1,2,4")
    s.add_argument("--base-rev", default=scan.SCAN_BASE_REV, help="the commit of today's scan")
    s.add_argument("--base-tree", help="today's code unpacked already (git archive BASE_REV)")
    s.add_argument("--workloads", help="where the workload files are (made if missing)")
    s.add_argument("--repeat", type=int, default=3, help="runs of each arm (the minimum is reported)")
    s.add_argument("--cpus", help="pin every job to these cores (taskset -c), e.g. 0,1")
    s.add_argument("--arms", help="a regular expression: run only the arms it finds")
    s.add_argument("--echo-start-s", type=float, default=0.0,
                   help="also the new scan behind an echo engine that takes this long to start")
    s.add_argument("--vllm", action="store_true", help="also launch-to-first-request with real vLLM")
    s.add_argument("--vllm-repeat", type=int, default=1)
    s.add_argument("--vllm-max-ranks", type=int, default=2)
    s.add_argument("--device-suite", default="cpu", choices=list(SUITES), help="engine arguments of this suite")
    s.add_argument("--model", default="spmd-dp/tiny-llama")
    s.add_argument("--vllm-kwargs", default="{}", help="JSON: more engine arguments (raw vLLM)")
    s.add_argument("--vllm-overrides", default="engine_options.device=cpu engine_options.cpu_cores_per_dp_rank=1 "
                   "engine_options.max_model_len=512", help="spmd_dp overrides of the vLLM arms")
    s.set_defaults(handler=scan.scan_suite)

    from scripts.bench import tail
    s = sub.add_parser("tail", help="the tail: shrinking claims against today's fixed claim target",
                       description=tail.__doc__)
    s.add_argument("--out", required=True)
    s.add_argument("--base-rev", default=tail.TAIL_BASE_REV, help="the commit of today's claims")
    s.add_argument("--capacity", type=int, default=256, help="the echo engine's max_num_seqs")
    s.add_argument("--records", type=int, default=1024, help="records of the skewed workloads")
    s.add_argument("--start-s", type=float, default=1.5, help="how late rank 3's echo engine starts")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--arms", help="a regular expression: run only the arms it finds")
    s.add_argument("--vllm", action="store_true", help="also real vLLM CPU at N=2 (the sorted workload)")
    s.add_argument("--vllm-repeat", type=int, default=1)
    s.set_defaults(handler=tail.tail_suite)

    from scripts.bench import scale
    s = sub.add_parser("scale", help="the control plane at scale: many echo ranks, the cost per batch",
                       description=scale.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True)
    s.add_argument("--ranks", default="2,8,32,64")
    s.add_argument("--modes", default="single,sharded")
    s.add_argument("--batches", type=int, default=48, help="batches per rank")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--words", type=int, default=16, help="output words (tokens) a record")
    s.add_argument("--prompt-words", type=int, default=160, help="prompt words a record (~1.1 KB; the row carries it)")
    s.add_argument("--delay", type=float, default=0.004, help="the echo engine's sleep per word")
    s.add_argument("--base-rev", help="also the code of this commit (today's control plane)")
    s.add_argument("--base-modes", default="sharded")
    s.add_argument("--timeout", type=float, default=1200)
    s.add_argument("--store-clients", default="1,4,16", help="also the store's add()s a second with these clients "
                   "('' for none)")
    s.set_defaults(handler=scale.scale_suite)

    from scripts.bench import gpu_session
    s = sub.add_parser("gpu-session", help="issue 18's checks on real GPUs, jobs side by side, one per GPU",
                       description=gpu_session.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True)
    s.add_argument("--phases", default="kill,structured,extras,first")
    s.add_argument("--prompts", type=int)
    s.add_argument("--rehearsal", action="store_true", help="on this machine's CPUs, the tiny model: the script's check")
    s.set_defaults(handler=gpu_session.gpu_session)

    from scripts.bench import gpu_verify
    s = sub.add_parser("gpu-verify", help="the GPU verification table: each rank's GPUs, its engine's, the output",
                       description=gpu_verify.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--run", action="store_true", help="run the layouts first (needs 4 GPUs)")
    s.add_argument("--out", required=True, help="with --run: the bench folder; else the markdown file to write")
    s.add_argument("inputs", nargs="*")
    s.set_defaults(handler=gpu_verify.gpu_verify)
    # three suites with command lines of their own: the rest of the line is theirs (`... images --help`)
    from scripts.bench import images, prefix, preflight
    for name, module, what in (("images", images, "images in prompts: spmd_dp N=1 against raw vLLM (issue 23)"),
                               ("prefix", prefix, "prefix affinity against input-order claims (issue 24)"),
                               ("preflight", preflight, "preflight's projection against the real run (issue 22)")):
        s = sub.add_parser(name, help=what, add_help=False)
        s.set_defaults(handler=module.main, own_args=True)
    return p


def main(argv=None) -> int:
    args, rest = parser().parse_known_args(argv)
    if getattr(args, "own_args", False):
        return args.handler(rest) or 0
    if rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    handler = args.handler
    del args.handler, args.command  # the subcommand's own arguments only (scale records them with its results)
    handler(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
