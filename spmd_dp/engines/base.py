"""The engine interface (what the generation loop needs from vLLM or the echo engine) and the types the prompt side
and the engines share: `Request`, `Completion`, `Chat`, `Pair`, `Image`. They live here, below both: no engine imports from
spmd_dp/prompting/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Union


class EngineStartError(Exception):
    """The engine could not start on this rank (the rank stays in the run with no work)."""


class EngineFailure(Exception):
    """The engine died or stalled mid-run (spmd_dp/engines/supervisor.py): its requests are lost.

    The generation loop then hands its work back (stalled) or keeps it, and calls the supervisor's
    `restart()`, which rebuilds the engine or raises `EngineGaveUp`."""

    def __init__(self, cause: str, stalled: bool = False) -> None:
        super().__init__(cause)
        self.cause, self.stalled = cause, stalled


class EngineGaveUp(Exception):
    """The rank's engine failed and cannot be restarted (max_engine_restarts used, or it cannot start)."""


@dataclass(repr=False)
class Image:
    """One image of a prompt, read by the rank that generates its record: the encoded bytes (PNG, JPEG, ...) as they
    were stored. Engines open it (vLLM: a PIL image for the model's own processor); nothing here decodes pixels."""

    data: bytes
    source: str  # where it came from, for messages: a path, a URL, "data: URL", "field 'image'"

    def open(self):
        """A PIL image (lazy: its header is read, its pixels when the processor asks for them)."""
        import io

        from PIL import Image as PILImage

        return PILImage.open(io.BytesIO(self.data))

    def __repr__(self) -> str:  # never the bytes (a request is logged, and sized by its text: generation.py)
        return f"<image {self.source}: {len(self.data)} bytes>"


IMAGE_PART = "image"  # a Chat content part {"type": "image", "image": Image}


@dataclass
class Chat:
    messages: List[Dict[str, Any]]  # content: a string, or a list of parts: {"type": "text", "text"}, IMAGE_PART

    def images(self) -> List[Image]:
        return [p["image"] for m in self.messages if isinstance(m.get("content"), list) for p in m["content"]
                if isinstance(p, dict) and p.get("type") == IMAGE_PART]

    def last_user_text(self) -> str:
        users = [text_of(m["content"]) for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass
class Pair:
    """task=score: the two texts whose relevance vLLM scores (LLM.score's data_1, data_2)."""

    query: str
    document: str


def text_of(content: Any) -> str:
    """A message's text: its string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


@dataclass
class Request:
    """One record's request, as spmd_dp/prompting/options.py builds it; each engine maps it onto its own API
    (vLLM: SamplingParams / PoolingParams, LoRARequest, the renderer's truncation)."""

    request_id: str
    prompt: Any  # str | token ids | Chat | Pair (task=score: query, document)
    sampling: Dict[str, Any]  # SamplingParams keyword arguments (structured_outputs: StructuredOutputsParams')
    task: str = "generate"  # generate | embed | classify | score | reward
    pooling: Dict[str, Any] = field(default_factory=dict)  # PoolingParams keyword arguments
    lora: Optional[str] = None  # an adapter named in engine_options.lora_adapters; None: the base model
    on_long_prompt: str = "fail"  # fail | skip | truncate_left | truncate_right (engines/context.py)
    clamp_max_tokens: bool = False
    max_retries: int = 0
    key: Any = None  # the record's primary key (messages, fault injection)
    images: List[Image] = field(default_factory=list)  # a text / token-id prompt's images (vLLM: multi_modal_data)

    def all_images(self) -> List[Image]:
        """Every image the request carries: a chat's image parts, or a text prompt's images."""
        return self.prompt.images() if isinstance(self.prompt, Chat) else list(self.images)


@dataclass
class Logprobs:
    """Per position: the chosen token's logprob and the top-k (ids, logprobs), k = the logprobs asked for.
    Column-wise (lists of equal length), so they are compact in JSONL and list columns in Parquet."""

    logprobs: List[Optional[float]] = field(default_factory=list)
    top_ids: List[List[int]] = field(default_factory=list)
    top_logprobs: List[List[float]] = field(default_factory=list)
    token_ids: Optional[List[int]] = None  # prompt logprobs only: the prompt's tokens
    tokens: Optional[List[str]] = None  # the chosen tokens' text (for the OpenAI output; not in spmd_dp's rows)
    top_tokens: Optional[List[List[str]]] = None


# Completion.error_kind: why a request has no result
REJECTED = "rejected"  # the engine refused it as given (bad input: on_bad_record decides)
SKIPPED = "skipped"  # on_long_prompt=skip: to the errors file, the run goes on
FAILED = "failed"  # the engine failed it (not the input's fault): tried again up to max_retries


@dataclass
class Completion:
    request_id: str
    texts: List[str] = field(default_factory=list)  # one per completion (generation_options.n)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: Optional[str] = None  # of the first completion
    finish_reasons: Optional[List[str]] = None  # of each completion (n > 1)
    error: Optional[str] = None  # the request has no result (see error_kind)
    error_kind: str = REJECTED
    token_ids: Optional[List[List[int]]] = None  # per completion
    logprobs: Optional[List[Logprobs]] = None  # per completion, when asked for
    prompt_logprobs: Optional[Logprobs] = None
    value: Union[None, float, List[float]] = None  # pooling tasks: embedding / class probabilities / score / reward
    truncated_from: Optional[int] = None  # on_long_prompt=truncate_*: the prompt's length before
    images: Optional[List[List[int]]] = None  # [width, height] of each image the engine was given (metadata)


class Engine(Protocol):
    capacity: int  # requests it runs at once (vLLM's max_num_seqs); keep more than this queued
    kv_tokens: Optional[int]  # tokens its KV cache holds (None: no limit); queued work beyond it only waits

    def add(self, request: Request) -> Optional[Completion]:
        """Queue a request; a rejected one comes back at once as a Completion with an error."""

    def step(self) -> List[Completion]:
        """Advance; return the requests that finished."""

    def close(self) -> None: ...
