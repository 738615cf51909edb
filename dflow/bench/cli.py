"""``dflow bench``: run a benchmark scenario against the serving modes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dflow.bench import LABEL, MODES

#: ``--dit-batch on``: the most requests one denoising step batches
DIT_BATCH = 8


@click.command(short_help="Compare four ways of serving a workload (emulated).")
@click.option(
    "--scenario",
    "name",
    required=True,
    help="A shipped scenario (S1: steady Flux on 24 GiB cards; S2: multi-model "
    "shift, S2-80 its earlier 80/10/10 variant; S3: heterogeneous fleet; S5: "
    "the seed's Wan 2.2 I2V on 8 A10s; S6, S6-MIX: resolution and batch "
    "alternating quickly; S7: PixArt 512/1024px, light then heavy, where DiT "
    "batching pays; S8: network jitter against a synchronous hand-off; "
    "S4: 1,000 workers) or a scenario YAML file "
    "(docs/scenarios.md).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for results.json and the plots.",
)
@click.option("--quick", is_flag=True, help="A shorter run (the file's quick keys).")
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(MODES),
    help="Run only these modes (repeatable; default the scenario's modes).",
)
@click.option(
    "--dit-batch",
    type=click.Choice(["off", "on"]),
    default="off",
    show_default=True,
    help=f"DiT batching: 'on' lets every worker batch up to {DIT_BATCH} requests' "
    "denoising steps (dflow.runtime.max-dit-batch), where the profiles say it gains.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=None,
    help="Run each mode this many times with different seeds and report the "
    "median with min and max (default the scenario's repeats, else 1).",
)
@click.option(
    "--capacity",
    is_flag=True,
    help="Also find, per mode, the highest rate with SLO attainment >= 90% by "
    "a rate sweep (--capacity-steps runs per mode and repeat).",
)
@click.option(
    "--capacity-steps",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Rates --capacity tries per mode and repeat (a bisection).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Fleets run at once, each in a process of its own: the modes, repeats "
    "and capacity bisections are independent runs (default the scenario's "
    "jobs, else 1).",
)
def bench(
    name: str,
    out: Path,
    quick: bool,
    modes: tuple[str, ...],
    dit_batch: str,
    repeats: int | None,
    capacity: bool,
    capacity_steps: int,
    jobs: int | None,
) -> None:
    """Run one workload on one emulated fleet, served by each mode of the
    scenario: monolithic replicas partitioned per model, the same autoscaled
    per model, stage pools at a static ratio, DisagFusion's threshold policy,
    and dflow's elastic controller (and its prediction-only and feedback-only
    ablations); where a scenario names it, the static pools with a
    synchronous hand-off. Writes OUT/results.json and PNG plots. Figures are
    emulated (cost model: H200 profile scaled by GPU type)."""
    from dflow.bench import report

    if name.upper() == "S4":
        from dflow.bench.scale import run_scale

        results = run_scale(out, quick=quick, echo=click.echo)
        click.echo(json.dumps(results["summary"], indent=2))
        return
    from dflow.bench.scenarios import ScenarioError, get

    try:
        scenario = get(name)
    except ScenarioError as error:
        raise click.BadParameter(str(error), param_hint="--scenario") from None
    unknown = [m for m in modes if m not in scenario.modes]
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)} not among {scenario.name}'s modes "
            f"({', '.join(scenario.modes)})",
            param_hint="--mode",
        )
    batching = f", DiT batching {dit_batch}"
    click.echo(f"{scenario.name}: {scenario.title} [{LABEL}{batching}]")
    bars: dict[str, object] = {}

    def progress(mode: str, elapsed: float, total: float) -> None:
        bar = bars.get(mode)
        if bar is None:
            for other in bars.values():
                other.__exit__(None, None, None)  # type: ignore[attr-defined]
            bar = click.progressbar(
                length=int(total), label=f"{mode:<22}", show_pos=True
            )
            bar.__enter__()
            bars.clear()
            bars[mode] = bar
        step = min(int(elapsed), int(total)) - bar.pos  # type: ignore[attr-defined]
        if step > 0:
            bar.update(step)  # type: ignore[attr-defined]

    with report.quiet():
        results = report.run_scenario(
            scenario,
            out,
            quick=quick,
            modes=modes or None,
            repeats=repeats,
            capacity=capacity,
            capacity_steps=capacity_steps,
            progress=progress,
            dit_batch=DIT_BATCH if dit_batch == "on" else 1,
            jobs=jobs,
        )
    for bar in bars.values():
        bar.__exit__(None, None, None)  # type: ignore[attr-defined]
    click.echo(report.table(results))
    click.echo(f"results: {out / 'results.json'}")
