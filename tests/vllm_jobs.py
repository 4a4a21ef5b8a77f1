"""The real-vLLM runs the vLLM tests share. A vLLM CPU engine takes ~25-35 s to start, so each job here is ONE run
of a workflow whose text_prompt nodes (each one test's job) keep the rank's engine from node to node
(spmd_dp/engines/cache.py); the engine starts again only where a node needs another one (LoRA, a pooling model).
The tests read a node's output and its part of the log; conftest starts, once per session and in the background
while the other tests run, the jobs the selected tests name in their marker (`@pytest.mark.vllm("two_ranks")`),
side by side where the cores allow; the vLLM tests run last.

What a reader would get wrong: a node's test does not need the whole run to succeed, only its node (the run
went past it): the last node of `two_ranks` is the kill -9 of an EngineCore, and only its own test fails if that
run then fails. Each job is pinned to cores of its own (taskset): a rank takes a core of its job's cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from spmd_dp.testing import (REPO, clean_env, doc_qa_records, engine_core_pid, image_bytes, make_records, read_jsonl,
                             running, torchrun_command, wait_until, worker_pids, write_jsonl)

# --- what the nodes read --------------------------------------------------------------------------------------

PROMPTS = ["The weather today is", "Tell me about rain", "Once upon a time", "What is a cloud?"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "label": {"enum": ["cat", "dog", "bird"]}},
          "required": ["ok", "label"], "additionalProperties": False}
REGEX = "[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is rain?"}]
MAX_MODEL_LEN = 128  # the generate engine of tiny-llama that most nodes share
GREEDY = [{"id": r["id"], "prompt": f"Tell me about {r['prompt']}"} for r in make_records(30, words=5)]
KILL_RECORDS = [{"id": f"k{i:04d}", "prompt": f"Tell me about w{i} and the day {i * 7}"} for i in range(256)]
KILL_SEED = 0  # the kill lands after random.Random(KILL_SEED).randint(1, 4) of rank 1's batches
BATCH = read_jsonl(REPO / "tests" / "data" / "openai_batch_chat_embeddings.jsonl")
TOO_LONG_CHAT = {"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": " ".join(["rain"] * 300)}]}}
LORAS = {"a": "spmd-dp/tiny-llama-lora-a", "b": "spmd-dp/tiny-llama-lora-b"}
SEED_DIR = REPO / "examples" / "workflows"

# one engine for every node below that uses it: max_num_seqs=16 makes the kill node's requests run in waves (its
# batches finish one after another); xgrammar takes whitespace from the engine's config, not the request's
TINY = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16,
        "vllm_kwargs": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}}
GREEDY_24 = {"temperature": 0, "max_tokens": 24}
LORA_ENGINE = {"max_model_len": 256}
LORA_GREEDY = {"temperature": 0, "max_tokens": 12}


def structured_records() -> List[dict]:
    records = []
    for i, p in enumerate(PROMPTS):
        records += [
            {"id": f"json{i}", "prompt": p,
             "generation_options": {"structured_outputs": {"json": SCHEMA}, "max_tokens": 64}},
            {"id": f"regex{i}", "prompt": p, "generation_options": {"structured_outputs": {"regex": REGEX}}},
            {"id": f"choice{i}", "prompt": p, "generation_options": {"structured_outputs": {"choice": CHOICES}}},
            {"id": f"grammar{i}", "prompt": p,
             "generation_options": {"structured_outputs": {"grammar": 'root ::= "x" ("y" | "z") "!"'}}},
        ]
    records += [{"id": f"lp{i}", "prompt": p, "generation_options": {"logprobs": 3, "prompt_logprobs": 2}}
                for i, p in enumerate(PROMPTS)]
    long = " ".join(["rain"] * 150)  # ~200 tokens: longer than max_model_len=128
    return records + [{"id": "left", "prompt": long, "on_long_prompt": "truncate_left"},
                      {"id": "plain", "prompt": "Tell me"}]


MIXED = [
    {"id": "plain", "prompt": "The weather today is"},
    {"id": "chat", "messages": CHAT},
    {"id": "ids", "prompt": [1, 17, 42, 99, 7]},
    {"id": "two", "prompt": "Once upon a time", "generation_options": {"n": 2, "temperature": 1.0}},
    {"id": "short", "prompt": "Tell me", "generation_options": {"max_tokens": 3, "ignore_eos": True}},
    {"id": "too_long", "prompt": [5] * 600},  # > max_model_len: refused by vLLM, skipped
]


def lora_records(who: str) -> List[dict]:
    """mixed: base-model records and both adapters' in one input; a or b: that adapter's records (the run's default
    adapter) beside base-model ones."""
    if who == "mixed":
        return [{"id": f"{w}{i}", "prompt": p, **({"lora_adapter": w} if w != "base" else {})}
                for i, p in enumerate(PROMPTS) for w in ("base", "a", "b")]
    return [{"id": f"{who}{i}", "prompt": p} for i, p in enumerate(PROMPTS)] + \
           [{"id": f"base{i}", "prompt": p, "lora_adapter": None} for i, p in enumerate(PROMPTS)]


# prefix affinity (tests/test_prefix_runs.py): a shuffled doc-QA sample whose documents' KV exceeds the cache (8
# blocks of 128 tokens; a document is 160 tokens); `pfx_on` first, then `pfx_off` on the engine it leaves (what
# `pfx_on` left cached can only raise pfx_off's hit rate: the comparison is the harder for it)
PREFIX_RECORDS = doc_qa_records(12, 6, doc_len=160, question_len=8, seed=4, vocab=1000)
PREFIX = dict(generation_options={"temperature": 0, "max_tokens": 4}, batch_size=4,
              engine_options={"max_model_len": 256, "vllm_kwargs": {"num_gpu_blocks_override": 8}})
IMAGE_QUESTION = "What is in the picture?"


def tokenizer_records(scale: int = 1) -> List[dict]:
    """Preflight's records (tests/test_preflight.py): prompts, chats and token ids of 2..80 tokens and more (x scale:
    a context of 64 tokens x scale cuts across them)."""
    rng = random.Random(7)
    words = ["rain", "über", "naïve", "日本語", "🙂", "x", "longerword", "a"]
    out = []
    for i in range(120):
        n = rng.randint(2, 40) * scale
        if i % 5 == 0:
            out.append({"id": i, "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": " ".join(rng.choices(words, k=n))}]})
        elif i % 7 == 0:
            out.append({"id": i, "prompt": [rng.randint(6, 900) for _ in range(n * 2)]})
        else:
            out.append({"id": i, "prompt": " ".join(rng.choices(words, k=n))})
    return out


# preflight=true (node pf), then the same job (node pfrun): on_long_prompt=skip, on the TINY engine (max_model_len
# 128) that node `one` starts before them, over tokenizer_records(PREFLIGHT_SCALE): some fit, some do not
PREFLIGHT = dict(engine_options=TINY, batch_size=8, on_long_prompt="skip",
                 generation_options={"max_tokens": 16, "temperature": 0})
PREFLIGHT_SCALE = MAX_MODEL_LEN // 64


def image_node(folder: Path) -> dict:
    """A tiny Idefics3 with dummy weights (spmd_dp/models/vision.py; tests/test_images_vllm.py), images in the
    data folder: one, two, a data: URL, none, token ids with the <image> token, token ids without it."""
    import base64

    from transformers import AutoTokenizer

    from spmd_dp.models.vision import write_folder

    model = folder / "idefics3-tiny"
    write_folder("idefics3-tiny", model)
    d = folder / "data"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wide.png").write_bytes(image_bytes(96, 40))  # 112x47: 2x1 tiles + the global one
    (d / "square.jpg").write_bytes(image_bytes(60, 60, "JPEG"))  # 112x112: 2x2 tiles + the global one
    url = "data:image/png;base64," + base64.b64encode(image_bytes(96, 40, seed=3)).decode()
    tok = AutoTokenizer.from_pretrained(model)
    image, words = tok.convert_tokens_to_ids("<image>"), tok.encode("the weather", add_special_tokens=False)
    records = [
        {"id": "one", "prompt": IMAGE_QUESTION, "image": "wide.png"},
        {"id": "two", "prompt": IMAGE_QUESTION, "image": ["wide.png", "square.jpg"]},
        {"id": "url", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": IMAGE_QUESTION}]}]},
        {"id": "none", "prompt": IMAGE_QUESTION, "image": None},
        {"id": "ids", "prompt": [image] + words, "image": "square.jpg"},  # vLLM's multi_modal_data with token ids
        {"id": "no_placeholder", "prompt": words, "image": "square.jpg"},
    ]
    return node(folder, "images", records, model_name=str(model), image_field="image", chat=True,
                return_metadata=True, on_bad_record="skip", batch_size=2,
                generation_options={"max_tokens": 4, "temperature": 0},
                engine_options={"max_model_len": 1024, "limit_mm_per_prompt": 2,
                                "vllm_kwargs": {"load_format": "dummy"}})


def node(folder: Path, name: str, records: Sequence[dict], **params) -> dict:
    write_jsonl(folder / "data" / f"{name}.jsonl", records)
    return {"id": name, "type": "text_prompt", "dependencies": [],
            "params": {"name": name, "data_dir": str(folder / "data"), "input_data_path": f"{name}.jsonl", **params}}


def workflow(folder: Path, nodes: Sequence[dict]) -> List[str]:
    """The overrides of a run of these nodes, in this order, writing ${folder}/out/${name}.*"""
    path = folder / "workflow.json"
    path.write_text(json.dumps({"name": folder.name, "output_dir": str(folder / "out"), "nodes": list(nodes)},
                               indent=1))
    return [f"workflow={path}"]


# --- the jobs -------------------------------------------------------------------------------------------------

def two_ranks(folder: Path) -> List[str]:
    """2 ranks: the OpenAI Batch file (a generate and an embed engine per rank); prefix affinity on and off (a
    small KV cache); then one generate engine per rank for greedy text, chat/token ids/n/per-record options,
    structured outputs and logprobs, and a kill -9 of rank 1's EngineCore in the last node (`killed`; `ref`: the
    same records undisturbed). Nodes on one engine follow each other: an engine start costs ~30 s here."""
    kill = dict(generation_options={"temperature": 0, "max_tokens": 32, "ignore_eos": True}, batch_size=8,
                schedule="static", engine_options=TINY)  # static: rank 1 has its half whenever its engine is up
    return workflow(folder, [
        # static, batch_size=3: records 0-3 on rank 0 (batches 0, 1), 4-6 on rank 1 (batch 2); request-2 and
        # request-4 embed the same text, one on each rank
        node(folder, "results", [TOO_LONG_CHAT] + BATCH, input_format="openai_batch", task=["generate", "embed"],
             schedule="static", batch_size=3, generation_options={"temperature": 0},
             engine_options={"max_model_len": 256}),
        node(folder, "pfx_on", PREFIX_RECORDS, prefix_affinity=True, **PREFIX),
        node(folder, "pfx_off", PREFIX_RECORDS, prefix_affinity=False, **PREFIX),
        node(folder, "two", GREEDY, generation_options=GREEDY_24, batch_size=4, engine_options=TINY),
        node(folder, "mixed", MIXED, generation_options=GREEDY_24, batch_size=4, return_metadata=True,
             on_bad_record="skip", engine_options=TINY),
        node(folder, "so", structured_records(), generation_options={"temperature": 0.8, "max_tokens": 24},
             batch_size=4, return_metadata=True, schedule="static", engine_options=TINY),
        node(folder, "ref", KILL_RECORDS, **kill),
        node(folder, "killed", KILL_RECORDS, **kill),
    ])


def one_rank_a(folder: Path) -> List[str]:
    """1 rank: LoRA: both adapters mixed, then adapter a alone; images on a tiny vision model."""
    return workflow(folder, [
        node(folder, "lora_mixed", lora_records("mixed"), generation_options=LORA_GREEDY, batch_size=4,
             engine_options={**LORA_ENGINE, "lora_adapters": LORAS}),
        node(folder, "lora_a", lora_records("a"), generation_options=LORA_GREEDY, batch_size=4, lora_adapter="a",
             engine_options={**LORA_ENGINE, "lora_adapters": {"a": LORAS["a"]}}),
        image_node(folder),
    ])


def one_rank_b(folder: Path) -> List[str]:
    """1 rank: adapter b alone; classify, reward and score on the 1-label model; embed and score on the LM; then
    one generate engine (TINY) for the greedy records of `two`, preflight=true, and the same job without it."""
    cls = [{"id": f"{t}{i}", "prompt": p, "task": t} for i, p in enumerate(PROMPTS) for t in ("classify", "reward")]
    cls += [{"id": f"score{i}", "prompt": PROMPTS[0], "document": d, "task": "score"} for i, d in enumerate(PROMPTS)]
    bi = [{"id": i, "prompt": PROMPTS[0], "document": d, "task": "score"} for i, d in enumerate(PROMPTS)]
    bi += [{"id": 10 + i, "prompt": t, "task": "embed"} for i, t in enumerate(PROMPTS)]
    return workflow(folder, [
        node(folder, "lora_b", lora_records("b"), generation_options=LORA_GREEDY, batch_size=4, lora_adapter="b",
             engine_options={**LORA_ENGINE, "lora_adapters": {"b": LORAS["b"]}}),
        node(folder, "cls", cls, model_name="spmd-dp/tiny-llama-reward", task=["classify", "reward", "score"],
             batch_size=4),
        node(folder, "bi", bi, task=["embed", "score"], batch_size=4),
        node(folder, "one", GREEDY, generation_options=GREEDY_24, batch_size=4, engine_options=TINY),
        node(folder, "pf", tokenizer_records(PREFLIGHT_SCALE), preflight={"enabled": True}, **PREFLIGHT),
        node(folder, "pfrun", tokenizer_records(PREFLIGHT_SCALE), **PREFLIGHT),
    ])


def seed(file: str, *extra: str) -> Callable[[Path], List[str]]:
    """A seed workflow file, unchanged; the command line swaps in the embedded model, one core per rank
    (gpus_per_dp_rank=1), local folders for the seed's /data, /output, /prompts, and 32 tokens a record for the
    seed's 512 (random weights write random text: only the run is checked, not what it says)."""
    def args(folder: Path) -> List[str]:
        return [f"workflow={SEED_DIR / file}", "model_name=spmd-dp/tiny-llama", "engine_options.gpus_per_dp_rank=1",
                f"data_dir={REPO / 'examples' / 'data'}", f"output_dir={folder / 'out'}", f"prompts_dir={folder}",
                "generation_options.max_tokens=32", *extra]
    return args


def kill_engine_core(proc: subprocess.Popen, log: Path, info: dict, node_name: str = "killed") -> None:
    """Once rank 1 has finished `after` batches of the node, kill -9 its EngineCore. What happened goes to `info`
    (core, after, t_kill; or error) for the test to assert on; the run goes on either way."""
    after = info["after"] = random.Random(KILL_SEED).randint(1, 4)

    def batches() -> int:
        text = log.read_text()
        start = re.search(rf"workflow node \d+/\d+: {node_name}\n", text)
        return len(re.findall(r"Received results for batch \d+ from rank 1", text[start.end():])) if start else 0

    if not wait_until(lambda: batches() >= after, 600, proc):
        info["error"] = f"the run {'ended' if proc.poll() is not None else 'took too long'} before rank 1 " \
                        f"finished {after} batches of node {node_name}"
        return
    rank1 = worker_pids(proc.pid).get(1)
    core = engine_core_pid(rank1) if rank1 else None
    if core is None:
        info["error"] = "no EngineCore under rank 1: " + \
            subprocess.run(["ps", "-ef", "--forest"], capture_output=True, text=True).stdout
        return
    os.kill(core, signal.SIGKILL)
    info.update(core=core, t_kill=time.time())


@dataclass
class Job:
    name: str
    nproc: Optional[int]  # None: one process (python -m spmd_dp); else torchrun's --nproc-per-node
    args: Callable[[Path], List[str]]  # the overrides, given the job's folder (where they write inputs)
    during: Optional[Callable[[subprocess.Popen, Path, dict], None]] = None  # done to the run while it runs


JOBS = {job.name: job for job in [
    Job("two_ranks", 2, two_ranks, during=kill_engine_core),
    Job("one_rank_a", None, one_rank_a),
    Job("one_rank_b", None, one_rank_b),
    # seed 000's first example: one text_prompt node (data_parallel_size 2 in the file); the input comes from the
    # command line
    Job("seed_single_node", 2, seed("seed_single_node.json", "input_data_path=dataset.jsonl",
                                    "engine_options.max_model_len=2048")),
    # seed 000's complete example: load -> parallel_generation (data_parallel_size 4 in the file: 2 ranks here)
    Job("seed_data_parallel_workflow", 2,
        seed("seed_data_parallel_workflow.json", "engine_options.data_parallel_size=2")),
]}


# --- running them ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One job's run: its exit code (None: it did not end in time), its log (every rank, stdout and stderr),
    its output folder, and what was done to it while it ran."""
    job: str
    returncode: Optional[int]
    log: str
    out: Path
    info: dict = field(default_factory=dict)
    wall_s: float = 0.0
    start_s: float = 0.0  # when it started, from the start of run_jobs
    cores: List[int] = field(default_factory=list)  # the cores the job was pinned to (its ranks take one each)

    def tail(self, n: int = 5000) -> str:
        return f"[{self.job}: exit {self.returncode}]\n{self.log[-n:]}"

    def section(self, name: str) -> str:
        """The log from rank 0's 'workflow node k/N: name' to the next node's line."""
        m = re.search(rf"workflow node (\d+)/(\d+): {name}\n", self.log)
        assert m, f"node {name} did not start\n{self.tail()}"
        end = self.log.find(f"workflow node {int(m.group(1)) + 1}/{m.group(2)}: ", m.end())
        return self.log[m.end(): end if end >= 0 else len(self.log)]

    def finished(self, name: str) -> bool:
        """The node ran to its end: the run exited 0, or went on to the next node."""
        if self.returncode == 0:
            return True
        m = re.search(rf"workflow node (\d+)/(\d+): {name}\n", self.log)
        return bool(m) and f"workflow node {int(m.group(1)) + 1}/{m.group(2)}: " in self.log[m.end():]

    def rows(self, name: str, suffix: str = "jsonl") -> List[dict]:
        assert self.finished(name), f"node {name} did not finish\n{self.tail()}"
        return read_jsonl(self.out / f"{name}.{suffix}")

    def metrics(self, name: str) -> dict:
        return json.loads((self.out / f"{name}.metrics.json").read_text())


def run_job(job: Job, folder: Path, cores: Sequence[int], vllm_port: int, timeout: float = 900) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    log, info = folder / "run.log", {}
    t0 = time.monotonic()
    with open(log, "w") as f:
        pin = ["taskset", "--cpu-list", ",".join(map(str, cores))]  # taskset execs: proc.pid is the run's
        proc = subprocess.Popen(pin + torchrun_command(job.args(folder), job.nproc), cwd=REPO, text=True,
                                env=clean_env({"VLLM_PORT": str(vllm_port)}), stdout=f, stderr=subprocess.STDOUT)
    with running(proc):  # whatever happens, it ends
        if job.during is not None:
            job.during(proc, log, info)
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            info["error"] = f"the run did not end within {timeout:.0f} s"
    info["t_end"] = time.time()
    return Run(job.name, proc.returncode if "did not end" not in info.get("error", "") else None, log.read_text(),
               folder / "out", info, round(time.monotonic() - t0, 1), cores=list(cores))


def _run_into(runs: Dict[str, Run], job: Job, folder: Path, cores: List[int], port: int, start_s: float) -> None:
    try:
        runs[job.name] = run_job(job, folder, cores, port)
    except Exception:  # a fault of this module: the job's tests show it
        runs[job.name] = Run(job.name, None, traceback.format_exc(), folder / "out", {"error": "the job raised"})
    runs[job.name].start_s = start_s


def run_jobs(names: Sequence[str], root: Path) -> Dict[str, Run]:
    """Run the named jobs, several at once where the cores allow: a one-rank job takes a core of its own (an
    engine start is mostly one busy core: imports, loading), a job of N ranks N cores (all, if fewer)."""
    t0 = time.monotonic()
    cores = sorted(os.sched_getaffinity(0))
    pending = [JOBS[n] for n in JOBS if n in names]  # JOBS' order: the first ones fill the cores first
    runs: Dict[str, Run] = {}
    busy: Dict[str, tuple] = {}  # name -> (thread, cores it holds)
    free = list(cores)
    while pending or busy:
        for job in list(pending):
            need = min(job.nproc or 1, len(cores))
            if need <= len(free):
                held, free = free[:need], free[need:]
                port = 40000 + 1000 * list(JOBS).index(job.name)
                t = threading.Thread(target=_run_into, daemon=True, args=(runs, job, root / job.name, held, port,
                                                                         round(time.monotonic() - t0, 1)))
                t.start()
                busy[job.name] = (t, held)
                pending.remove(job)
        time.sleep(0.2)
        for name, (t, held) in list(busy.items()):
            if not t.is_alive():
                free = sorted(free + held)
                del busy[name]
    return runs


class VllmRuns:
    """The session's runs by job name. They start in the background as the session starts (conftest), while the
    other tests run; a test that reads one waits for it (each job ends within 900 s)."""

    def __init__(self, names: Sequence[str], root: Path, start: bool = True) -> None:
        self.root, self.runs = root, {}
        self.thread = threading.Thread(target=self._run, args=(list(names),), name="vllm-jobs", daemon=True)
        if start:
            self.thread.start()

    def _run(self, names: List[str]) -> None:
        self.runs.update(run_jobs(names, self.root))
        (self.root / "jobs.txt").write_text("".join(f"{r.job}: exit {r.returncode}, started at +{r.start_s}s, ran "
                                                    f"{r.wall_s}s on cores {r.cores}\n" for r in self.runs.values()))

    def __getitem__(self, name: str) -> Run:
        if self.thread.ident is None:  # not started yet (pytest-xdist: conftest.py)
            self.thread.start()
        self.thread.join(timeout=900 * len(JOBS))
        if name not in self.runs:  # a test that did not name its job in its marker
            self.runs.update(run_jobs([name], self.root))
        return self.runs[name]
