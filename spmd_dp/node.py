"""Opening a workflow node, on every rank: the input scan all ranks share, then rank 0's journal, then the
`WorkOrder` every rank gets.

`Node` is what a rank knows of a node before it starts: its config, the rank's plan, its prompt builder and
its `Output` (spmd_dp/output/sink.py), each built once. `open_node` scans a share of the input in the
rank's scanner processes (forked by `fork_scanners` before the engine's thread starts), merges the shares
into the index every rank reads batches through (spmd_dp/inputs/), lets rank 0 open the journal
(spmd_dp/rank0.py: resume, or refuse another run's output) and broadcasts what it says to do. A bad input is
the same one-line error on every rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from spmd_dp.config import RunConfig
from spmd_dp.control.claims import Span
from spmd_dp.errors import UsageError
from spmd_dp.inputs import InputIndex, RecordSpec, ScanResult, locations, shared_scan
from spmd_dp.inputs.order import RecordOrder
from spmd_dp.inputs.scanners import Scanners, scan_processes
from spmd_dp.output.sink import Output
from spmd_dp.plan import RankPlan
from spmd_dp.prompting.prompts import PromptBuilder


@dataclass
class Node:
    """One workflow node as this rank runs it."""

    cfg: RunConfig
    plan: RankPlan
    prompts: PromptBuilder
    output: Output

    @classmethod
    def build(cls, cfg: RunConfig, plan: RankPlan) -> "Node":
        return cls(cfg, plan, PromptBuilder(cfg), Output(cfg))  # a template is checked here, before any work

    def record_spec(self) -> RecordSpec:
        """What a valid record is for this node; a table without the prompt's column is refused up front (unless a
        template decides what the prompt reads)."""
        cfg, prompts = self.cfg, self.prompts
        columns = None if prompts.template is not None else (cfg.prompt_field, cfg.messages_field)
        keyed = self.order_mode is not False
        return RecordSpec(cfg.primary_key, prompts.check, columns, prompts.check_keyed if keyed else None,
                          whole_key=cfg.prefix_field is not None)

    @property
    def order_mode(self):
        """prefix_affinity as the scan takes it (spmd_dp/inputs/order.py): False, "auto", or True (prefix_field:
        the records name their groups)."""
        cfg = self.cfg
        return True if cfg.prefix_field is not None else cfg.prefix_affinity


@dataclass
class WorkOrder:
    """What rank 0 tells every rank before the work starts (broadcast as JSON)."""

    pending: List[Span] = field(default_factory=list)  # spans of slots (the record order's) not committed yet
    complete: bool = False  # the journal says the output is written already
    error: Optional[str] = None  # a UsageError's line: every rank exits 2
    shared: Optional[str] = None  # sharded output: the marker rank 0 left in the parts' folder


def fork_scanners(node: Node) -> Scanners:
    """The processes that will scan this rank's share of the input, forked now: before the engine starts."""
    cfg, plan = node.cfg, node.plan
    kind = "cpu_engine" if plan.device.kind == "cpu" and cfg.inference_engine != "echo" else plan.device.kind
    return Scanners(node.record_spec(), cfg.batch_size, cfg.storage_options or None,
                    scan_processes(kind, plan.env.local_world_size))


def scan_node(node: Node, group, scanners: Optional[Scanners]) -> ScanResult:
    """The input scan every rank shares (spmd_dp/inputs/scan.py), with this node's config (also preflight's)."""
    cfg = node.cfg
    return shared_scan(locations(cfg.data_dir, cfg.input_data_path), cfg.input_format, node.record_spec(),
                       cfg.batch_size, cfg.on_bad_record == "skip", group, cfg.storage_options or None, scanners,
                       node.order_mode)


def open_node(node: Node, group, rank0, scanners: Optional[Scanners]
              ) -> Tuple[Optional[InputIndex], Optional[RecordOrder], WorkOrder]:
    """Every rank: scan a share of the input (merged over `group`, spmd_dp/control/comm.py's group) in its scanners,
    then rank 0 (`rank0`, None elsewhere) opens the journal; the WorkOrder is rank 0's, on every rank. The record
    order (spmd_dp/inputs/order.py) says which records a span of the WorkOrder's slots holds."""
    try:
        result = scan_node(node, group, scanners)
    except UsageError as e:
        return None, None, WorkOrder(error=str(e))
    work = WorkOrder(**group.broadcast_json(asdict(rank0.open(result)) if rank0 else None))
    work.error = work.error or node.output.check_shared(group, work.shared)
    return result.index, result.order, work
