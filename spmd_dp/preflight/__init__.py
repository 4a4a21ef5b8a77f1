"""Preflight (`preflight=true` on the run's own command): before spending GPU-hours, what the input holds, which
records will not fit the context and what happens to them, and how long the run will take and cost.

  flow.py       one rank's preflight of a workflow node (scan, count, time the engine, rank 0 reports)
  tokens.py     prompt tokens as the run's engine counts them; a rank's pass over its share of the records
  calibrate.py  a rank's engine timed on a sample drawn across the input
  project.py    from the timed samples to the generation time at this and other world sizes, GPU-hours, cost
  report.py     ${name}.preflight.json and the printed summary

It writes nothing but ${name}.preflight.json (docs/observability.md).
"""

from spmd_dp.preflight.flow import preflight_node

__all__ = ["preflight_node"]
