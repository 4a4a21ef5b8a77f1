"""The echo engine: a deterministic dry run with no model and no vLLM import.

A request's text is the first `max_tokens` whitespace-separated words of its
prompt joined by single spaces (a chat's prompt is its last user turn, token ids
count as words); the engine sleeps `echo_delay_s` per word it
returns, so its time grows with output length like a real engine's. Requests
run one after another. A prompt of more words than `engine_options.max_model_len`
is refused, as vLLM refuses one of more tokens. `echo_fail_ranks` lists ranks whose
engine fails at start (fault injection, to rehearse a rank that cannot start);
`echo_start_s` is how long it takes to start (to rehearse a slow start, as vLLM's).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Deque, List, Optional

from spmd_dp.engines.base import Completion, EngineStartError, Request
from spmd_dp.prompts import Chat


class EchoEngine:
    def __init__(self, options, batch_size: int, rank: int) -> None:
        if rank in options.echo_fail_ranks:
            raise EngineStartError(f"echo engine: rank {rank} is listed in engine_options.echo_fail_ranks")
        time.sleep(options.echo_start_s)
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
        req = self.queue.popleft()
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
        self.queue.clear()
