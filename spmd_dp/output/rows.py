"""The shape of an output row, and a finished batch's rows.

A row is the input record plus the result under `${name}`: the generated text (a list
when `generation_options.n` > 1), or for pooling tasks the embedding / class
probabilities (float32 lists) or the score / reward (a float). Beside it, when asked:
`${name}_token_ids` (output token ids), `${name}_logprobs` and `${name}_prompt_logprobs`
(column-wise: the chosen token's logprob and the top-k ids and logprobs per position;
lists in JSONL, list columns of float32 in Parquet), `${name}_metadata`. With
`input_format=openai_batch` a row is the OpenAI output line instead (spmd_dp/prompting/openai_batch.py).
Rows stay dicts until a sink writes them (spmd_dp/output/sink.py): JSON lines, or Parquet without a second parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from spmd_dp.config import RunConfig
from spmd_dp.engines.base import FAILED, REJECTED, Completion, Logprobs
from spmd_dp.prompting.openai_batch import output_record

BAD_RECORD = "skipped: a bad input record"  # the error of a record the scan found bad (on_bad_record=skip)


def output_row(record: Dict[str, Any], name: str, c: Completion, metadata: Optional[Dict[str, Any]],
               token_ids: bool = False) -> Dict[str, Any]:
    """One output row: the record, its result under `name` (a list when n > 1), token ids and logprobs
    when asked (`token_ids`: return_token_ids), its metadata when asked."""
    out = dict(record)

    def one_or_all(items: List[Any]) -> Any:
        return items[0] if len(items) == 1 else items

    out[name] = c.value if c.value is not None else one_or_all(c.texts)
    if c.token_ids is not None and (token_ids or c.logprobs is not None):
        out[f"{name}_token_ids"] = one_or_all(c.token_ids)
    if c.logprobs is not None:
        out[f"{name}_logprobs"] = one_or_all([_columns(lp) for lp in c.logprobs])
    if c.prompt_logprobs is not None:
        out[f"{name}_prompt_logprobs"] = {"token_ids": c.prompt_logprobs.token_ids, **_columns(c.prompt_logprobs)}
    if metadata is not None:
        out[f"{name}_metadata"] = metadata
    return out


def _columns(lp: Logprobs) -> Dict[str, Any]:
    return {"logprobs": lp.logprobs, "top_ids": lp.top_ids, "top_logprobs": lp.top_logprobs}


def float32_columns(name: str) -> List[str]:
    """The output's columns of floats spmd_dp writes (vectors, scores, logprobs): float32 in Parquet."""
    return [name, f"{name}_logprobs", f"{name}_prompt_logprobs"]


@dataclass
class Rows:
    """A finished batch, shaped: its rows in input order, the records the engine refused, token counts."""

    rows: List[Dict[str, Any]] = field(default_factory=list)
    errors: List[Dict[str, Any]] = field(default_factory=list)  # {position, key, error}: the errors file
    prompt_tokens: int = 0
    output_tokens: int = 0


class RowShaper:
    """A node's rows from (record, completion) pairs: its own row shape, or the OpenAI output line."""

    def __init__(self, cfg: RunConfig, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self.openai = cfg.input_format == "openai_batch"

    def shape(self, batch_index: int, start: int, records: Sequence[Optional[Dict[str, Any]]],
              done: Sequence[Completion], tries: Sequence[int]) -> Rows:
        """records[i] (None: a bad record the scan reported) is input record start + i; done[i] its completion;
        tries[i] how many times it was retried."""
        cfg, out = self.cfg, Rows()
        for i, (record, c) in enumerate(zip(records, done)):
            if c.error == BAD_RECORD:
                continue
            if self.openai:  # every request has its line, an error line if it failed
                out.rows.append(output_record(record, c, cfg.model_name))
                if c.error is None:
                    out.prompt_tokens += c.prompt_tokens
                    out.output_tokens += c.output_tokens
                continue
            if c.error is not None:
                what = {REJECTED: "rejected by the engine", FAILED: "failed in the engine"}.get(c.error_kind, "skipped")
                out.errors.append({"position": start + i, "key": record[cfg.primary_key], "error": f"{what}: {c.error}"})
                continue
            metadata = None
            if cfg.return_metadata:
                metadata = {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                            "output_tokens": c.output_tokens, "rank": self.rank, "batch": batch_index}
                if c.truncated_from is not None:
                    metadata["truncated_from"] = c.truncated_from
                if c.images:
                    metadata["images"] = c.images  # [width, height] of each image the engine was given
                if tries[i]:
                    metadata["retries"] = tries[i]
            out.rows.append(output_row(record, cfg.name, c, metadata, cfg.return_token_ids))
            out.prompt_tokens += c.prompt_tokens
            out.output_tokens += c.output_tokens
        return out
