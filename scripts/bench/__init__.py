"""spmd_dp's benchmarks: a library (one module per workload) and one CLI, run from the repository root:

  python -m scripts.bench suite cpu|gpu --out DIR [--phases p1,p2] [--prompts N]   raw vLLM, the DP example, spmd_dp
  python -m scripts.bench report --out DIR RESULTS_DIR...                          merge phase results into one report
  python -m scripts.bench scan --out DIR [--records 1000000] [--ranks 1,2,4] [--vllm]   the shared input scan
  python -m scripts.bench tail --out DIR [--repeat 3] [--vllm]                     shrinking claims at the tail
  python -m scripts.bench scale --out DIR [--ranks 2,8,32,64]                      the control plane at many ranks
  python -m scripts.bench gpu-session --out DIR --phases kill,structured,...      issue 18's checks on 1-2 GPUs
  python -m scripts.bench gpu-verify --out DOC.md RESULTS_DIR...                   the GPU verification table

  common.py (suites, workloads, a job's process, a baseline tree, the environment), suite.py, report.py, scan.py,
  tail.py, scale.py, gpu_session.py, gpu_verify.py; __main__.py holds the CLI.

Figures are ratios from one run (same device, one job after the other or side by side on disjoint devices), never
asserted in timed tests; the commands come from spmd_dp.testing, as the tests' do.
"""
