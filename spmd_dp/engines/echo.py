"""The echo engine: a deterministic dry run with no model and no vLLM import.

A request's text is the first `max_tokens` whitespace-separated words of its
prompt joined by single spaces (a chat's prompt is its last user turn, token ids
count as words); the engine sleeps `echo_delay_s` per word it
returns, so its time grows with output length like a real engine's. Requests
run one after another (with no delay, a step finishes everything queued). Words stand for tokens: a prompt of more words than
`engine_options.max_model_len` is refused, as vLLM refuses one of more tokens,
or skipped / truncated / its max_tokens clamped as `on_long_prompt` and
`clamp_max_tokens` say (spmd_dp/engines/context.py, as the vLLM engine does).
A word's token id is its crc32 modulo 1000; logprobs are 0 for the echoed word.
Pooling tasks: `embed` gives an 8-float vector of the prompt's hash, `classify` the
shares of short / long words, `score` the overlap (Jaccard) of the two texts' words,
`reward` the number of words. Fault injection: `echo_fail_ranks` lists ranks whose
engine fails at start; `echo_fail_keys` records whose requests fail (error_kind
failed) `echo_fail_times` times each, then succeed (to rehearse `max_retries`).
Images (a chat's image parts, a text prompt's images) are opened as vLLM's engine opens them (PIL, the header
only: an image PIL cannot open is refused, as vLLM refuses it) and reported per record, [width, height] each,
in `${name}_metadata.images`; they add no words. Structured outputs and LoRA adapters are accepted and ignored (a dry run). `echo_start_s` is how long
it takes to start (to rehearse a slow start, as vLLM's), on the ranks `echo_start_ranks` lists (all: []).

Engine faults mid-run (spmd_dp/engines/supervisor.py): on `echo_fault_ranks` the engine
dies (`echo_fault=die`: its step raises, as vLLM's raises EngineDeadError) or stops
answering (`hang`: its step blocks until the engine is closed) after
`echo_fault_after_steps` steps, and so do the restarts of the first `echo_fault_times`
engines of the rank (`attempt` counts them from 0).
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections import deque
from typing import Deque, Dict, List, Optional

from spmd_dp.engines.base import FAILED, SKIPPED, Chat, Completion, EngineStartError, Logprobs, Pair, Request
from spmd_dp.engines.context import fit_context


class EchoEngine:
    def __init__(self, options, batch_size: int, rank: int, attempt: int = 0) -> None:
        if rank in options.echo_fail_ranks:
            raise EngineStartError(f"echo engine: rank {rank} is listed in engine_options.echo_fail_ranks")
        if not options.echo_start_ranks or rank in options.echo_start_ranks:
            time.sleep(options.echo_start_s)
        faulty = rank in options.echo_fault_ranks and attempt < options.echo_fault_times
        self.fault = options.echo_fault if faulty else None
        self.steps_left = options.echo_fault_after_steps
        self.closed = threading.Event()
        self.delay = options.echo_delay_s
        self.max_model_len = options.max_model_len
        self.fail_keys = {str(k) for k in options.echo_fail_keys}
        self.fail_times = options.echo_fail_times
        self.failures: Dict[str, int] = {}
        self.truncated: Dict[str, int] = {}  # request id -> prompt words before truncation
        self.sizes: Dict[str, List[List[int]]] = {}  # request id -> [width, height] of each of its images
        self.capacity = options.max_num_seqs or batch_size  # what it holds at once (as vLLM's max_num_seqs)
        self.concurrency = 1 if self.delay else self.capacity  # what it runs at once: with a delay, one after another
        self.kv_tokens = None
        self.queue: Deque[Request] = deque()

    def add(self, request: Request) -> Optional[Completion]:
        try:
            sizes = [list(img.open().size) for img in request.all_images()]
        except Exception as e:  # PIL: UnidentifiedImageError, a truncated header, ...
            return Completion(request.request_id, error=f"an image cannot be opened ({type(e).__name__}: {e})")
        words = self._words(request.prompt)
        generate = request.task == "generate"
        fit = fit_context(len(words), int(request.sampling.get("max_tokens", 16)), self.max_model_len,
                          request.on_long_prompt, request.clamp_max_tokens, generate, unit="words")
        if fit.action == "refuse":
            return Completion(request.request_id, error=fit.reason)
        if fit.action == "skip":
            return Completion(request.request_id, error=fit.reason, error_kind=SKIPPED)
        if fit.action == "truncate":
            kept = words[-fit.keep:] if request.on_long_prompt == "truncate_left" else words[:fit.keep]
            request.prompt = " ".join(kept)
            self.truncated[request.request_id] = len(words)
        if fit.max_tokens is not None:
            request.sampling["max_tokens"] = fit.max_tokens
        self.sizes[request.request_id] = sizes
        self.queue.append(request)
        return None

    @staticmethod
    def _words(prompt) -> List[str]:
        if isinstance(prompt, Chat):
            prompt = prompt.last_user_text()
        elif isinstance(prompt, Pair):
            prompt = f"{prompt.query} {prompt.document}"
        return prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]

    def step(self) -> List[Completion]:
        if not self.queue:
            return []
        if self.fault is not None:
            if self.steps_left == 0:
                if self.fault == "hang":
                    self.closed.wait()  # until the supervisor gives up on it and closes it
                    return []
                raise RuntimeError("echo engine died (fault injection: engine_options.echo_fault_ranks)")
            self.steps_left -= 1
        if not self.delay:
            out: List[Completion] = []
            while self.queue:
                out += self._run(self.queue.popleft())
            return out
        return self._run(self.queue.popleft())

    def _run(self, req: Request) -> List[Completion]:
        key = str(req.key)
        if key in self.fail_keys and self.failures.get(key, 0) < self.fail_times:
            self.failures[key] = self.failures.get(key, 0) + 1
            return [Completion(req.request_id, error=f"echo engine: injected failure {self.failures[key]} of "
                                                     f"{self.fail_times} (engine_options.echo_fail_keys)",
                               error_kind=FAILED)]
        words = self._words(req.prompt)
        truncated = self.truncated.pop(req.request_id, None)
        images = self.sizes.pop(req.request_id, None) or None
        if req.task != "generate":
            return [Completion(req.request_id, prompt_tokens=len(words), value=self._pool(req),
                               finish_reason="stop", truncated_from=truncated, images=images)]
        max_tokens = int(req.sampling.get("max_tokens", 16))
        if self.max_model_len is not None:  # as vLLM, the output stops at the end of the context
            max_tokens = min(max_tokens, self.max_model_len - len(words))
        out = words[:max_tokens]
        if self.delay:
            time.sleep(self.delay * len(out))
        text = " ".join(out)
        n = int(req.sampling.get("n", 1))
        ids = [zlib.crc32(w.encode()) % 1000 for w in out]
        logprobs = None
        if req.sampling.get("logprobs") is not None:
            k = int(req.sampling["logprobs"])
            one = Logprobs([0.0] * len(out), [[i] * min(k, 1) for i in ids], [[0.0] * min(k, 1) for _ in ids],
                           tokens=list(out), top_tokens=[[w] * min(k, 1) for w in out])
            logprobs = [one] * n
        return [Completion(req.request_id, [text] * n, prompt_tokens=len(words), output_tokens=len(out) * n,
                           finish_reason="length" if len(words) >= max_tokens else "stop",
                           token_ids=[ids] * n, logprobs=logprobs, truncated_from=truncated, images=images)]

    @staticmethod
    def _pool(req: Request):
        if isinstance(req.prompt, Pair):  # score: word overlap
            a, b = set(req.prompt.query.split()), set(req.prompt.document.split())
            return len(a & b) / len(a | b) if a | b else 0.0
        words = EchoEngine._words(req.prompt)
        if req.task == "embed":
            digest = hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()
            return [round(b / 255.0, 6) for b in digest][: req.pooling.get("dimensions") or 8]
        if req.task == "classify":
            short = sum(len(w) <= 4 for w in words) / max(len(words), 1)
            return [short, 1.0 - short]
        return float(len(words))  # reward

    def close(self) -> None:
        self.closed.set()
        self.queue.clear()
