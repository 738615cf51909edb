"""``dflow bench``: one workload on one emulated fleet, served four ways.

- :mod:`~dflow.bench.workload` and :mod:`~dflow.bench.scenarios`: the traces and
  scenarios S1-S4;
- :mod:`~dflow.bench.physics`: what the fleet can serve at best (pure);
- :mod:`~dflow.bench.run`, :mod:`~dflow.bench.recorder`,
  :mod:`~dflow.bench.baselines` and :mod:`~dflow.bench.handoff`: one mode on
  an in-process fleet;
- :mod:`~dflow.bench.metrics`: what a run measured (pure);
- :mod:`~dflow.bench.report`: a scenario end to end, ``results.json`` and the
  table; :mod:`~dflow.bench.plots`: its figures;
- :mod:`~dflow.bench.scale`: S4, 1,000 workers on one scheduler;
- :mod:`~dflow.bench.chaos`: the chaos run; :mod:`~dflow.bench.env`: what a
  benchmark ran on.
"""

from __future__ import annotations

#: The label every figure of ``dflow bench`` carries
LABEL = "emulated (cost model: H200 profile scaled by GPU type)"
#: The serving modes a scenario can run: (a) monolithic replicas partitioned per
#: model; (b) the same moved by a Ray-Serve-style autoscaler; (c) dflow's stage
#: pools at a static ratio; DisagFusion's threshold policy on the same pools;
#: dflow's controller with prediction alone, with feedback alone, and (d) as
#: shipped, the hybrid; (c) with a synchronous hand-off; (c) with a two-expert
#: model's DiT split into one pool per expert (:mod:`dflow.bench.run` says what
#: each runs)
MODES = (
    "monolithic",
    "monolithic_autoscaled",
    "static",
    "disagfusion",
    "prediction_only",
    "feedback_only",
    "elastic",
    "synchronous",
    "static_experts",
)
#: The modes a scenario runs only when it names them: ``synchronous``, the
#: static pools with each stage task submitted when the previous one finishes
#: (:mod:`dflow.bench.handoff`), which the jitter benchmark compares against,
#: and ``static_experts``, which only a two-expert model's scenario can run
NAMED_ONLY = ("synchronous", "static_experts")
#: The modes a scenario runs when it names none
DEFAULT_MODES = tuple(m for m in MODES if m not in NAMED_ONLY)
#: The modes served by monolithic replicas
MONOLITHIC_MODES = ("monolithic", "monolithic_autoscaled")
#: The modes in which dflow's elastic controller moves workers
CONTROLLED = ("prediction_only", "feedback_only", "elastic")
