"""Claims that balance the tail, for real (torchrun, 4 ranks, the echo engine): one engine that starts late gets
a share of the work instead of nothing, and a sorted skewed workload (longest first) spreads its work evenly.
Under the fixed claim target of before, the three early ranks claimed everything before the late one came up
(it got 0 records), and each rank claimed its fair share of records at once, the longest ones on the first ranks
(work max / mean 1.98; python -m scripts.bench tail). The assertions count records and words (the echo engine's work),
not seconds; the times are printed."""

import json
import math
import random

import pytest

from spmd_dp.testing import spmd, write_jsonl


def run(tmp_path, records, *extra):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd([f"data_dir={inp.parent}", "input_data_path=in.jsonl", f"output_dir={tmp_path / 'out'}", "name=out",
              "inference_engine=echo", "batch_size=8", "generation_options.max_tokens=96", "log_level=WARNING",
              *extra], nproc=4, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = json.loads((tmp_path / "out" / "out.metrics.json").read_text())["ranks"]
    s0 = min(r["gen_start_unix"] for r in ranks)
    span = max(r["gen_end_unix"] for r in ranks) - s0
    ideal = (sum(r["busy_s"] for r in ranks) + sum(r["gen_start_unix"] - s0 for r in ranks)) / 4
    print(f"span {span:.2f} s, ideal {ideal:.2f} s ({span / ideal:.3f}); records {[r['records'] for r in ranks]}, "
          f"words {[r['output_tokens'] for r in ranks]}")
    return ranks


@pytest.mark.timing
def test_an_engine_that_starts_late_gets_its_share(tmp_path):
    records = [{"id": i, "prompt": "w x y z"} for i in range(512)]  # one engine-full (128) per rank
    ranks = run(tmp_path, records, "engine_options.max_num_seqs=128", "engine_options.echo_delay_s=0.0025",
                "engine_options.echo_start_s=1.0", "engine_options.echo_start_ranks=[3]")
    assert sum(r["records"] for r in ranks) == 512
    assert ranks[3]["records"] >= 16  # at least two batches; the fixed target left it none
    assert ranks[3]["records"] < min(r["records"] for r in ranks[:3])  # it came up last: it does the least


@pytest.mark.timing
def test_a_sorted_skewed_workload_spreads_its_work(tmp_path):
    rng = random.Random(0)
    lengths = sorted((int(min(96, max(1, rng.lognormvariate(math.log(8), 1.0)))) for _ in range(2048)), reverse=True)
    records = [{"id": i, "prompt": " ".join(["w"] * 96), "generation_options": {"max_tokens": n}}
               for i, n in enumerate(lengths)]
    # an engine-full (64) well below a rank's share (512), as on a real run: the first engine up takes at most
    # 64 / 4 records of the longest before the others have reported, whatever the order the processes start in
    ranks = run(tmp_path, records, "engine_options.max_num_seqs=64", "engine_options.echo_delay_s=0.0003")
    words = [r["output_tokens"] for r in ranks]
    assert sum(words) == sum(lengths)
    assert max(words) / (sum(words) / 4) < 1.3, words  # the fixed target: ~2 (the longest all on rank 0)
