"""Accept a machine in one budgeted command: the environment, the data, the step and every loader's
throughput, the GPU tests, a preempted and resumed DALI training run and the built-in Fashion-MNIST GPU
configuration, each cut to its share of the time, with the results written as they come.

    python -m benchmark.acceptance                        # every check; on CUDA within 480 s
    python -m benchmark.acceptance --budget 300 --corpus DIR --results R
    python -m benchmark.acceptance --quick --budget 120   # the same checks at tiny sizes (default without CUDA)
    python -m benchmark.acceptance --checks throughput,dali-train

`PLAN` below is the whole acceptance: the checks in the order they run (the figures nothing else can
give first), each with the seconds it needs to say anything (`needs`) and the most it may take (`takes`).
A check starts only when the budget still holds its `needs` plus the `needs` of every check after it;
it then gets up to its `takes`, cut to what is left after keeping those. A check the budget cannot hold is
`skipped` with the reason ("not started for time"), never started and killed. The last check takes all
that is left. Every check's work runs as subprocesses killed at its time (benchmark/checks.py), and a
line at least every 15 s says what is running (the child's last log line).

After every check (and on SIGTERM or Ctrl-C, with the running check marked interrupted), `summary.json`
and `summary.md` are rewritten in the results folder, so a run killed at any moment keeps every check it
finished; throughput.json is rewritten by the benchmark after every figure. The process exits 0 when every
check passed or was skipped for a stated reason, 1 otherwise, 2 on bad arguments (one line, nothing run).

Results (`--results`, default benchmark/results/acceptance-<device>-<date>/):
    summary.json  every check: verdict, reason, numbers, seconds, command, log; device, versions, git
                  commit, date, the budget, and one entry per invocation under `runs` (a second invocation
                  into the same folder replaces the checks it reruns and keeps the others)
    summary.md    the same as a table
    logs/         one log per check; gpu-tests-*.xml (JUnit)
    throughput.json, throughput.png          benchmark/throughput.py's result and chart
    <check>/metrics.{jsonl,csv,png}, eval.json  the training runs' metric files (checkpoints and
                  backbones stay in the scratch folder under --cache)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark import checks
from benchmark.checks import MODES, REPO, CheckResult, Context
from benchmark.make_corpus import find_photos
from benchmark.progress import Budget, Heartbeat
from benchmark.report import write_json

SCHEMA_VERSION = 2
DEFAULT_BUDGET_S = {"full": 480.0, "quick": None}  # on CUDA: one device command of at most 8 minutes
CORPUS_ENV = "FASTBYOL_CORPUS"  # a prebuilt corpus (the GPU machine's kit sets it: no photos there)
ENVIRONMENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Check:
    """One planned check: `run(ctx, seconds)`; `needs` / `takes`: {mode: seconds} (see the module doc)."""

    name: str
    run: Callable[[Context, float], CheckResult]
    needs: dict[str, float]
    takes: dict[str, float]
    reads_corpus: bool = False


INF = float("inf")
PLAN: tuple[Check, ...] = (
    Check("data", checks.check_data, {"quick": 10, "full": 10}, {"quick": 120, "full": 60}),
    Check("throughput", checks.check_throughput, {"quick": 30, "full": 150}, {"quick": 150, "full": 230},
          reads_corpus=True),
    Check("gpu-tests", checks.check_gpu_tests, {"quick": 10, "full": 30}, {"quick": 90, "full": 90}),
    Check("dali-train", checks.check_dali_train, {"quick": 25, "full": 40}, {"quick": 120, "full": 90},
          reads_corpus=True),
    Check("fashion-mnist", checks.check_fashion_mnist, {"quick": 30, "full": 60}, {"quick": INF, "full": INF}),
)
CHECKS = ("environment", *(check.name for check in PLAN))


def allowed_seconds(check: Check, later: list[Check], mode: str, budget: Budget) -> float | None:
    """The seconds `check` may take now: up to its `takes`, keeping the `needs` of every later check;
    None when the budget cannot hold its own `needs` on top of those."""
    reserve = sum(c.needs[mode] for c in later)
    allowed = budget.allow(check.needs[mode], reserve)
    return None if allowed is None else min(check.takes[mode], allowed)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _finish(result: CheckResult, ctx: Context, started: float, cpu_started: float) -> CheckResult:
    result.seconds = round(time.monotonic() - started, 1)
    result.cpu_seconds = round(children_cpu_seconds() - cpu_started, 1)
    result.date, result.mode = _now(), ctx.mode.name
    log = ctx.logs / f"{result.name}.log"
    if log.is_file():
        result.log = str(log.relative_to(ctx.results))
        if result.verdict == "fail" and not result.log_tail:
            result.log_tail = checks.tail(log)
    return result


# ---------------------------------------------------------------------------------------------------------
# the summary files
# ---------------------------------------------------------------------------------------------------------

def load_summary(results: Path, mode: str) -> dict:
    """The folder's earlier summary, or a fresh one; a summary of the other mode is not merged with this
    one (quick and full numbers must not share a table)."""
    path = results / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("mode") == mode and summary.get("schema_version") == SCHEMA_VERSION:
            return summary
        print(f"note: {path} holds a {summary.get('mode')} run; starting a new summary", file=sys.stderr)
    return {"schema_version": SCHEMA_VERSION, "mode": mode, "checks": {}, "runs": []}


def update_summary(summary: dict, ctx: Context, results: list[CheckResult], run: dict) -> dict:
    facts = ctx.facts or {}
    summary["checks"].update({r.name: dataclasses.asdict(r) for r in results})
    summary["checks"] = {name: summary["checks"][name] for name in CHECKS if name in summary["checks"]}
    summary["runs"] = [r for r in summary["runs"] if r["id"] != run["id"]] + [run]
    torch_facts = facts.get("torch", {})
    summary.update(
        date=_now(), device=facts.get("device"), device_name=facts.get("device_name"),
        git_commit=facts.get("git_commit"), hostname=facts.get("hostname"),
        driver=facts.get("driver", {}).get("nvidia_smi"),
        versions={**facts.get("versions", {}), "torch": torch_facts.get("version"),
                  "torch_cuda": torch_facts.get("cuda"), "dali": facts.get("dali", {}).get("version"),
                  "ffcv": facts.get("ffcv", {}).get("version")},
        passed=all(c["verdict"] != "fail" for c in summary["checks"].values()),
    )
    return summary


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict) -> str:
    versions = summary["versions"]
    verdict = ("**accepted**: every check passed or was skipped for the stated reason" if summary["passed"]
               else "**not accepted**: see the failed checks and their logs in logs/")
    run = summary["runs"][-1] if summary["runs"] else {}
    lines = [
        f"# Acceptance: {summary['device_name']} ({summary['mode']} mode)", "",
        f"{summary['date']}, commit {summary['git_commit']}, driver {summary.get('driver')}, torch "
        f"{versions.get('torch')} (CUDA {versions.get('torch_cuda')}), DALI {versions.get('dali')}, ffcv "
        f"{versions.get('ffcv')}; budget {run.get('budget_s')} s, command "
        f"`python -m benchmark.acceptance {' '.join(run.get('argv', []))}`", "",
        verdict, "",
        "| check | verdict | seconds | CPU s | numbers | reason |", "|---|---|---:|---:|---|---|",
    ]
    for name, check in summary["checks"].items():
        lines.append(f"| {name} | {check['verdict']} | {check['seconds']:.0f} | {check.get('cpu_seconds', 0):.0f} | "
                     f"{_cell(check['headline'])} | {_cell(check['reason'])} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, results: Path) -> None:
    write_json(summary, results / "summary.json")
    tmp = results / ".summary.md.tmp"
    tmp.write_text(summary_markdown(summary))
    os.replace(tmp, results / "summary.md")


VERDICT_STYLE = {"pass": "green", "fail": "bold red", "skipped": "yellow"}


def print_table(summary: dict, ran: set[str], console: Console) -> None:
    table = Table(title=f"acceptance on {summary['device_name']} ({summary['mode']} mode)")
    for column in ("check", "verdict", "s", "numbers", "reason"):
        table.add_column(column, justify="right" if column == "s" else "left", overflow="fold")
    for name, check in summary["checks"].items():
        style = VERDICT_STYLE[check["verdict"]]
        table.add_row(name + ("" if name in ran else " (earlier)"), f"[{style}]{check['verdict']}[/]",
                      f"{check['seconds']:.0f}", escape(check["headline"]), escape(check["reason"]))
    console.print(table)


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------

class ArgumentError(ValueError):
    """Bad input, found before any check runs: one line, exit code 2."""


class Interrupted(Exception):
    """SIGTERM reached the acceptance run; the running check is stopped and reported."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmark.acceptance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", help=f"comma-separated subset of {','.join(CHECKS)} "
                        "(environment always runs; data is added when a check needs it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes (default without CUDA)")
    mode.add_argument("--full", action="store_true", help="GPU acceptance sizes (default with CUDA)")
    parser.add_argument("--budget", type=float, help="seconds for the whole command; checks are sized to fit and "
                        "one that cannot fit is skipped (default: 480 with CUDA, none in quick mode)")
    parser.add_argument("--results", type=Path, help="results folder (default: "
                        "benchmark/results/acceptance-<device>-<date>/); an existing summary there is extended")
    parser.add_argument("--corpus", default=os.environ.get(CORPUS_ENV),
                        help=f"prebuilt ImageFolder of JPEGs (default: ${CORPUS_ENV}, else build one in --cache)")
    parser.add_argument("--beton", help="prebuilt .beton of the corpus (default: convert the corpus into --cache)")
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "bench",
                        help="built corpus and .beton (shared with benchmark/throughput.py), scratch run folders")
    return parser.parse_args(argv)


def selected_checks(args: argparse.Namespace) -> tuple[Check, ...]:
    if args.checks is None:
        return PLAN
    names = {name.strip() for name in args.checks.split(",") if name.strip()}
    if unknown := names - set(CHECKS):
        raise ArgumentError(f"--checks: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if any(check.reads_corpus and check.name in names for check in PLAN):
        names.add("data")
    return tuple(check for check in PLAN if check.name in names)


def photos_available() -> bool:
    try:
        find_photos()
    except SystemExit:
        return False
    return True


def preflight(args: argparse.Namespace, plan: tuple[Check, ...]) -> None:
    """Reject what cannot work before minutes are spent on the checks that come first."""
    if args.budget is not None and args.budget <= 0:
        raise ArgumentError(f"--budget must be above 0 seconds, got {args.budget}")
    if args.corpus is not None:
        try:
            checks.count_images(args.corpus)
        except (ValueError, OSError) as err:
            raise ArgumentError(f"--corpus {args.corpus}: {err}") from None
    if args.beton is not None and not Path(args.beton).is_file():
        raise ArgumentError(f"--beton {args.beton}: no such file (make one with python -m datasources.ffcv_convert "
                            "--src <corpus> --out <file>.beton, or leave --beton out to convert the corpus)")
    needs_photos = args.corpus is None and any(check.reads_corpus for check in plan)
    if needs_photos and not any(checks.default_corpus(args.cache, m).is_dir() for m in MODES.values()) \
            and not photos_available():
        raise ArgumentError(f"no corpus: give --corpus DIR or set ${CORPUS_ENV} (an ImageFolder of JPEGs, e.g. "
                            "one made elsewhere with python -m benchmark.make_corpus) or install the photos it is "
                            "built from (apt-get install mate-backgrounds ukui-wallpapers lomiri-wallpapers)")


def default_results(facts: dict | None) -> Path:
    name = "cpu"
    if facts and facts.get("device") == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", facts["device_name"].lower()).strip("-")
    return REPO / "benchmark" / "results" / f"acceptance-{name}-{dt.date.today().isoformat()}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (a job's time limit) raises Interrupted, so the running check's process group is killed
    and the summary is written; the default would leave the children running on the GPU."""
    def handler(signum, frame):
        raise Interrupted(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _announce(result: CheckResult, console: Console) -> None:
    style = VERDICT_STYLE[result.verdict]
    detail = " - ".join(part for part in (result.headline, result.reason) if part)
    console.print(f"[{style}]{result.verdict:>7}[/] {result.name} ({result.seconds:.0f} s) {escape(detail)}")


def run(args: argparse.Namespace, console: Console) -> int:
    plan = selected_checks(args)
    preflight(args, plan)
    with stop_on_signals(), Heartbeat("acceptance") as beat:
        return run_plan(args, plan, console, beat)


def run_plan(args: argparse.Namespace, plan: tuple[Check, ...], console: Console, beat: Heartbeat,
             clock: Callable[[], float] = time.monotonic) -> int:
    started, cpu_started = time.monotonic(), children_cpu_seconds()
    beat.phase("environment: probing torch, CUDA, DALI, nvJPEG, ffcv")
    with tempfile.TemporaryDirectory() as tmp:
        facts, probe = checks.gather_facts(Path(tmp) / "environment.log", ENVIRONMENT_TIMEOUT_S)
        cuda = bool(facts and facts["torch"]["cuda_available"])
        if args.full and not cuda:
            raise ArgumentError("--full needs a CUDA device and torch sees none; use --quick")
        mode = MODES["full" if args.full or (cuda and not args.quick) else "quick"]
        results = (args.results or default_results(facts)).resolve()
        (results / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "environment.log", results / "logs" / "environment.log")
    seconds = args.budget if args.budget is not None else DEFAULT_BUDGET_S[mode.name]
    budget = Budget(seconds, clock, started=clock() - (time.monotonic() - started))  # the probe's seconds count
    ctx = Context(mode, results, args.cache.resolve(), args.corpus, args.beton, facts or {}, beat,
                  photos_available(), budgeted=budget.limited)
    console.print(f"acceptance ({mode.name} mode, budget {'none' if seconds is None else f'{seconds:.0f} s'}): "
                  f"{', '.join(['environment', *(c.name for c in plan)])} -> {results}")
    summary = load_summary(results, mode.name)
    run_entry = {"id": _now(), "argv": sys.argv[1:], "mode": mode.name,
                 "budget_s": seconds, "checks": ["environment", *(c.name for c in plan)]}
    done = [_finish(checks.check_environment(ctx, probe), ctx, started, cpu_started)]
    _announce(done[0], console)
    with contextlib.suppress(Interrupted, KeyboardInterrupt):  # a signal between checks: the summary below
        for i, check in enumerate(plan):
            write_summary(update_summary(summary, ctx, done, run_entry), results)
            check_started, cpu_started = time.monotonic(), children_cpu_seconds()
            result = run_check(ctx, check, list(plan[i + 1:]), budget, beat)
            if result is None:  # interrupted: reported, and nothing after it runs
                done.append(_finish(CheckResult(check.name, "fail", "interrupted (SIGTERM or Ctrl-C) while running"),
                                    ctx, check_started, cpu_started))
                break
            done.append(_finish(result, ctx, check_started, cpu_started))
            _announce(done[-1], console)
    run_entry["seconds"] = round(time.monotonic() - started, 1)
    write_summary(update_summary(summary, ctx, done, run_entry), results)
    print_table(summary, {r.name for r in done}, console)
    skipped = [r.name for r in done if r.reason.startswith("not started for time")]
    if skipped:
        console.print(f"skipped for time: {', '.join(skipped)} (raise --budget to run them)")
    console.print(f"wrote {results / 'summary.json'}, {results / 'summary.md'}")
    return 1 if any(r.verdict == "fail" for r in done) else 0


def run_check(ctx: Context, check: Check, later: list[Check], budget: Budget, beat: Heartbeat) -> CheckResult | None:
    """One check within the budget, never raising: a bug in a check is its failure; None when interrupted."""
    mode = ctx.mode.name
    seconds = allowed_seconds(check, later, mode, budget)
    if seconds is None:
        kept = sum(c.needs[mode] for c in later)
        return CheckResult(check.name, "skipped", f"not started for time: needs {check.needs[mode]:.0f} s, "
                           f"{budget.left():.0f} s left" + (f" of which {kept:.0f} s are kept for "
                                                             f"{', '.join(c.name for c in later)}" if later else ""))
    if check.reads_corpus and ctx.data_failed:
        return CheckResult(check.name, "fail", f"not run: the data check failed ({ctx.data_failed})")
    beat.phase(f"{check.name}: started, " + (f"up to {seconds:.0f} s" if seconds < INF else "no time limit"))
    try:
        result = check.run(ctx, seconds)
    except (Interrupted, KeyboardInterrupt):
        return None
    except Exception as err:
        result = CheckResult(check.name, "fail", f"{type(err).__name__}: {err}")
    if check.name == "data" and result.verdict == "fail":
        ctx.data_failed = result.reason
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Piped output (CI logs, tee) would otherwise wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return run(args, console)
    except ArgumentError as err:
        print(f"acceptance: error: {err}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("acceptance: interrupted before any check ran", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
