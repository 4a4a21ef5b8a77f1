"""Images in prompts: spmd_dp N=1 against raw vLLM on the same device, one after the other (issue 23).

  python -m scripts.bench images --out DIR [--data DIR] [--model DIR] [--records 1536] [--forms chat,generate]
  python -m scripts.bench images --out DIR --rehearsal      (CPU: a tiny Idefics3 on vLLM CPU, 48 records)
  python -m scripts.bench images --out DIR --rehearsal --engine echo   (spmd_dp's side only, the echo engine)

The workload (spmd_dp.testing.write_image_records): one JPEG file per record, of a few sizes in turn, each image
unique (vLLM's processor cache never hits), the same question for every record. Two forms, each run by both:
  chat      raw: LLM.chat(conversations of an image_pil part + the question), the images opened from their files;
            spmd_dp: chat=true image_field=image (the same parts through LLM.chat's own rendering)
  generate  raw: LLM.generate({"prompt": text with the model's image placeholders, "multi_modal_data"});
            spmd_dp: chat=false image_field=image, the same text in the prompt field
Both: temperature 0, ignore_eos, the same max_tokens and engine arguments (load_format=dummy on a weight-less
folder, spmd_dp.models.vision). Figures: images/s and output tok/s over each one's generation span (raw: from the
engine being ready to the last output, reading the image files included; spmd_dp: its metrics' generation span,
first request to last output), and spmd_dp / raw. Results: DIR/bench-images.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List


from spmd_dp.testing import REPO, clean_env, read_jsonl, torchrun_command, write_image_records, write_jsonl

QUESTION = "Describe this image in one sentence."
PLACEHOLDERS = {  # the model family's text prompt around one image (what its chat template writes)
    "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": "<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant:",
}


def engine_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    kw = {"model": a.model, "load_format": "dummy", "max_model_len": a.max_model_len, "disable_log_stats": True,
          "limit_mm_per_prompt": {"image": 1}}
    if a.device == "cpu":  # as spmd_dp does on CPU
        kw.update(enforce_eager=True, dtype="float32")
    return kw


def raw_main(a: argparse.Namespace) -> None:
    """One raw vLLM process over the whole workload (this script with `raw`)."""
    launch = time.time()
    from PIL import Image
    from vllm import LLM, SamplingParams

    recs = read_jsonl(Path(a.workload))
    base = Path(a.workload).parent
    llm = LLM(**json.loads(a.engine_kwargs))
    ready = time.time()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=a.max_tokens)
    if a.form == "chat":
        convs = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(base / r["image"])},
                                               {"type": "text", "text": r["prompt"]}]}] for r in recs]
        outs = llm.chat(convs, params, use_tqdm=False)
    else:
        outs = llm.generate([{"prompt": r["text"], "multi_modal_data": {"image": Image.open(base / r["image"])}}
                             for r in recs], params, use_tqdm=False)
    done = time.time()
    Path(a.result).write_text(json.dumps({
        "records": len(outs), "images": len(outs), "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "gen_s": round(done - ready, 3),
        "engine_start_s": round(ready - launch, 2)}))


def workload(a: argparse.Namespace, d: Path) -> Path:
    path = d / "images.jsonl"
    if path.exists():
        return path
    family = json.loads((Path(a.model) / "config.json").read_text())["model_type"] if a.engine != "echo" else "idefics3"
    text = PLACEHOLDERS.get(family, "<image>{q}").format(q=QUESTION)
    t0 = time.time()
    recs = write_image_records(d, a.records, [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")],
                               fmt="JPEG", prompt=QUESTION)
    write_jsonl(path, [{**r, "text": text} for r in recs])
    print(f"workload: {len(recs)} records, images {a.sizes}, in {time.time() - t0:.1f} s -> {path}", flush=True)
    return path


def _env(a: argparse.Namespace) -> Dict[str, str]:
    env = clean_env({"VLLM_NO_USAGE_STATS": "1"})
    if a.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:  # as spmd_dp sets it for a CPU engine (else vLLM CPU reserves 92% of the node's memory); one core each
        env.update(VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_CPU_OMP_THREADS_BIND="0")
    return env


def raw_job(a: argparse.Namespace, form: str, wl: Path, out: Path) -> Dict[str, Any]:
    result, log = out / f"raw-{form}.json", out / f"raw-{form}.log"
    cmd = [sys.executable, "-m", "scripts.bench", "images", "raw", "--workload", str(wl), "--form", form, "--result", str(result),
           "--max-tokens", str(a.max_tokens), "--engine-kwargs", json.dumps(engine_kwargs(a))]
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=_env(a), stdout=f, stderr=subprocess.STDOUT, timeout=1500).returncode
    if code:
        return {"label": f"raw-{form}", "exit_code": code, "error": log.read_text()[-3000:]}
    return {"label": f"raw-{form}", "exit_code": 0, "wall_s": round(time.time() - t0, 1), **json.loads(result.read_text())}


def spmd_job(a: argparse.Namespace, form: str, wl: Path, out: Path) -> Dict[str, Any]:
    label = f"spmd-{form}"
    overrides = [f"data_dir={wl.parent}", f"input_data_path={wl.name}", f"output_dir={out / label}", "name=out",
                 f"model_name={a.model}", "image_field=image", f"chat={'true' if form == 'chat' else 'false'}",
                 *([] if form == "chat" else ["prompt_field=text"]), "batch_size=32", "overwrite=true",
                 "generation_options.temperature=0", "generation_options.seed=null", "generation_options.ignore_eos=true",
                 f"generation_options.max_tokens={a.max_tokens}", f"engine_options.max_model_len={a.max_model_len}",
                 "engine_options.limit_mm_per_prompt=1", "+engine_options.vllm_kwargs.load_format=dummy",
                 f"inference_engine={'echo' if a.engine == 'echo' else 'vllm_dp'}", "log_level=INFO"]
    if a.device == "cpu":  # the engine's threads on core 0, as raw's (VLLM_CPU_OMP_THREADS_BIND=0)
        overrides += ["engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1"]
    t0 = time.time()
    with open(out / f"{label}.log", "w") as f:
        code = subprocess.run(torchrun_command(overrides, nproc=1), cwd=REPO, env=_env(a), stdout=f,
                              stderr=subprocess.STDOUT, timeout=1500).returncode
    if code:
        return {"label": label, "exit_code": code, "error": (out / f"{label}.log").read_text()[-3000:]}
    m = json.loads((out / label / "out.metrics.json").read_text())
    rows = read_jsonl(out / label / "out.jsonl")
    t = m["total"]
    return {"label": label, "exit_code": 0, "wall_s": round(time.time() - t0, 1), "records": len(rows),
            "images": len(rows), "output_tokens": t["output_tokens"], "prompt_tokens": t.get("prompt_tokens"),
            "gen_s": t["generation_s"], "engine_start_s": m["ranks"][0].get("engine_start_s")}


def rates(r: Dict[str, Any]) -> Dict[str, Any]:
    if r.get("exit_code") or not r.get("gen_s"):
        return r
    return {**r, "images_per_s": round(r["images"] / r["gen_s"], 2), "tok_per_s": round(r["output_tokens"] / r["gen_s"], 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench images", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="bench", choices=["bench", "raw"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--data", type=Path, help="where the image records are written (default: OUT/data); kept for reruns")
    ap.add_argument("--model", default=os.environ.get("BENCH_VLM", "/tmp/dummy-qwen2vl-7b"))
    ap.add_argument("--records", type=int, default=1536)
    ap.add_argument("--sizes", default="448x336,640x480,1024x768")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--forms", default="chat,generate")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "echo"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rehearsal", action="store_true", help="CPU: tiny Idefics3 on vLLM CPU, 48 small images")
    ap.add_argument("--workload"), ap.add_argument("--form"), ap.add_argument("--result"), ap.add_argument("--engine-kwargs")
    a = ap.parse_args(argv)
    if a.cmd == "raw":
        return raw_main(a)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.rehearsal:
        from spmd_dp.models.vision import write_folder

        a.device, a.records, a.sizes, a.max_tokens, a.max_model_len = "cpu", min(a.records, 48), "64x48,96x96,96x40", 16, 1024
        a.model = str(a.out / "idefics3-tiny")
        if not (a.out / "idefics3-tiny" / "config.json").exists():
            write_folder("idefics3-tiny", Path(a.model))
    wl = workload(a, a.data or a.out / "data")
    results: List[Dict[str, Any]] = []
    for form in a.forms.split(","):
        jobs = [spmd_job] if a.engine == "echo" else [raw_job, spmd_job]  # raw first, then spmd_dp: same device
        for job in jobs:
            r = rates(job(a, form, wl, a.out))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error"}), flush=True)
            if r.get("exit_code"):
                print(r["error"], file=sys.stderr)
        pair = {r["label"]: r for r in results if r["label"].endswith(form)}
        raw, spmd = pair.get(f"raw-{form}", {}), pair.get(f"spmd-{form}", {})
        if raw.get("tok_per_s") and spmd.get("tok_per_s"):
            print(f"{form}: spmd_dp/raw images/s {spmd['images_per_s'] / raw['images_per_s']:.3f}x, output tok/s "
                  f"{spmd['tok_per_s'] / raw['tok_per_s']:.3f}x ({spmd['images_per_s']} vs {raw['images_per_s']} "
                  f"images/s)", flush=True)
    (a.out / "bench-images.json").write_text(json.dumps({
        "model": a.model, "records": a.records, "sizes": a.sizes, "max_tokens": a.max_tokens, "device": a.device,
        "engine": a.engine, "results": results}, indent=2))
    if any(r.get("exit_code") for r in results):
        sys.exit(1)

