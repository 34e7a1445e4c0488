"""Output of a throughput result (the dict documented in benchmark/throughput.py): a rich table on the
console, the JSON file, and a PNG bar chart (log scale: loaders and steps differ by orders of magnitude)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

SECTION_TITLES = {"decode": "decode only", "loader": "loader only", "step": "step only",
                  "end_to_end": "end to end", "ffcv_variants": "ffcv variant"}
SECTION_COLOURS = {"decode": "tab:gray", "loader": "tab:blue", "step": "tab:red", "end_to_end": "tab:green",
                   "ffcv_variants": "tab:purple"}


def rows(result: dict) -> list[tuple[str, str, dict]]:
    """(section, name, measurement) for every measured figure, in section order."""
    return [(section, name, rate) for section in SECTION_TITLES
            for name, rate in result["sections"].get(section, {}).items()]


def print_report(result: dict, console: Console | None = None) -> None:
    # Piped output (CI logs, tee) would otherwise wrap the table at 80 columns.
    console = console or (Console() if sys.stdout.isatty() else Console(width=140))
    setup, env = result["setup"], result["environment"]
    table = Table(title=f"BYOL throughput on {env['device_name']} ({env['device']}, {env['cpu_cores_used']} cores) "
                        f"- {setup['arch']} at {setup['res']} px, batch {setup['batch_size']}")
    for column in ("section", "name", "images/s"):
        table.add_column(column, justify="right" if column == "images/s" else "left")
    table.add_column("spread", justify="right")
    table.add_column("runs", justify="left")
    table.add_column(f"x {result['baseline'] or 'baseline'}", justify="right")
    speedups = result["speedup_vs_baseline"]
    for section, name, rate in rows(result):
        speedup = speedups.get(name) if section == "loader" else None
        table.add_row(SECTION_TITLES[section], name, f"{rate['images_per_s']:,.1f}", f"{rate['spread_pct']:.0f}%",
                      ", ".join(f"{r:,.1f}" for r in rate["runs"]), f"{speedup:.2f}" if speedup else "")
    console.print(table)
    if result["verdict"]:
        verdicts = Table(title=f"verdict against the step ceiling ({result['ceiling']})")
        for column in ("loader", "bound", "loader/step", "end-to-end % of step", "loader % of decode limit"):
            verdicts.add_column(column)
        for name, v in result["verdict"].items():
            e2e = _pct(v["end_to_end_pct_of_step"]) + (" (noise: above its own ceiling)" if v["above_ceiling"] else "")
            verdicts.add_row(name, v["bound"], f"{v['loader_over_step']:,.2f}", e2e, _pct(v["loader_pct_of_decode"]))
        console.print(verdicts)
    if agreement := result["lars_agreement"]:
        console.print(f"lars vs lars-loop after {agreement['steps']} steps: max |weight difference| "
                      f"{agreement['max_abs_diff']:.2e} (largest weight {agreement['max_abs_param']:.2e})")
    if costs := result["ffcv_costs"]:
        console.print(f"ffcv, one thread per image: decode {costs['decode_ms']:.3f} ms, crop-resize "
                      f"{costs['crop_ms']:.3f} ms -> decode-once model {costs['once_vs_twice_model']:.2f}x")
    for name, reason in result["skipped"].items():
        console.print(f"[yellow]skipped {name}:[/] {reason}")
    for note in setup["notes"]:
        console.print(f"[dim]note: {note}[/]")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}%"


def write_json(result: dict, path: Path) -> None:
    """Write atomically (a temp file renamed over `path`): a reader, or a run killed mid-write, only ever
    sees a whole JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def plot(result: dict, path: Path) -> bool:
    """Horizontal bars with min-max whiskers; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = rows(result)
    if not measured:
        return False
    labels = [f"{SECTION_TITLES[section]}: {name}" for section, name, _ in measured]
    medians = [rate["images_per_s"] for _, _, rate in measured]
    whiskers = [[m - rate["min"] for m, (_, _, rate) in zip(medians, measured, strict=True)],
                [rate["max"] - m for m, (_, _, rate) in zip(medians, measured, strict=True)]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(measured) + 1.6))
    ax.barh(labels, medians, xerr=whiskers, color=[SECTION_COLOURS[s] for s, _, _ in measured], capsize=3)
    ax.set_xscale("log")
    ax.set_xlim(right=max(rate["max"] for _, _, rate in measured) * 8)  # room for the value labels
    ceiling = result["sections"]["step"].get(result["ceiling"] or "")
    if ceiling:
        ax.axvline(ceiling["images_per_s"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"step ceiling ({result['ceiling']})")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (median of runs; whiskers min-max; an image = two views)")
    env, setup = result["environment"], result["setup"]
    ax.set_title(f"{env['device_name']} ({env['cpu_cores_used']} cores) - {setup['arch']} {setup['res']} px, "
                 f"batch {setup['batch_size']}", fontsize=9)
    for y, (m, (_, _, rate)) in enumerate(zip(medians, measured, strict=True)):
        ax.text(rate["max"] * 1.05, y, f"{m:,.1f}", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
