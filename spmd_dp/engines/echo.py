"""The echo engine: a deterministic dry run with no model and no vLLM import.

A request's text is the first `max_tokens` whitespace-separated words of its
prompt joined by single spaces (a chat's prompt is its last user turn, token ids
count as words); the engine sleeps `echo_delay_s` per word it
returns, so its time grows with output length like a real engine's. Requests
run one after another (with no delay, a step finishes everything queued). A prompt
of more words than `engine_options.max_model_len` is refused, as vLLM refuses one of
more tokens.

Fault injection, to rehearse failures with real processes and no model:
`echo_fail_ranks` lists ranks whose engine fails at start; on `echo_fault_ranks`
the engine dies (`echo_fault=die`: its step raises, as vLLM's raises EngineDeadError)
or stops answering (`hang`: its step blocks until the engine is closed) after
`echo_fault_after_steps` steps, and so do the restarts of the first
`echo_fault_times` engines of the rank (`attempt` counts them from 0).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, List, Optional

from spmd_dp.engines.base import Completion, EngineStartError, Request
from spmd_dp.prompts import Chat


class EchoEngine:
    def __init__(self, options, batch_size: int, rank: int, attempt: int = 0) -> None:
        if rank in options.echo_fail_ranks:
            raise EngineStartError(f"echo engine: rank {rank} is listed in engine_options.echo_fail_ranks")
        faulty = rank in options.echo_fault_ranks and attempt < options.echo_fault_times
        self.fault = options.echo_fault if faulty else None
        self.steps_left = options.echo_fault_after_steps
        self.closed = threading.Event()
        self.delay = options.echo_delay_s
        self.max_model_len = options.max_model_len
        self.capacity = batch_size
        self.kv_tokens = None
        self.queue: Deque[Request] = deque()

    def add(self, request: Request) -> Optional[Completion]:
        n = len(self._words(request.prompt))
        if self.max_model_len is not None and n > self.max_model_len:
            return Completion(request.request_id,
                              error=f"the prompt ({n} words) is longer than max_model_len={self.max_model_len}")
        self.queue.append(request)
        return None

    @staticmethod
    def _words(prompt) -> List[str]:
        if isinstance(prompt, Chat):
            prompt = prompt.last_user_text()
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
            out = []
            while self.queue:
                out += self._run(self.queue.popleft())
            return out
        return self._run(self.queue.popleft())

    def _run(self, req: Request) -> List[Completion]:
        words = self._words(req.prompt)
        max_tokens = int(req.sampling.get("max_tokens", 16))
        out = words[:max_tokens]
        if self.delay:
            time.sleep(self.delay * len(out))
        text = " ".join(out)
        n = int(req.sampling.get("n", 1))
        return [Completion(req.request_id, [text] * n, prompt_tokens=len(words), output_tokens=len(out) * n,
                           finish_reason="length" if len(words) >= max_tokens else "stop")]

    def close(self) -> None:
        self.closed.set()
        self.queue.clear()
