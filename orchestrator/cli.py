"""`instill`: run, validate and summarise sweeps."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

EXAMPLES = """\
examples:
  instill validate configs/quickstart.yaml
      check a sweep file and show its grid, without running anything
  instill run configs/quickstart.yaml --out runs/quickstart
      run the sweep on a local Ray started for it; results in runs/quickstart/results.parquet,
      summary table and plots in runs/quickstart/report/
  instill run configs/quickstart.yaml --out runs/quickstart
      (again, after an interruption) resume: only unfinished or failed trials run
  instill run configs/quickstart.yaml --out runs/quickstart --rerun-stale
      also rerun the finished trials whose rows came from another version of the code
  instill run configs/arithmetic-paper.yaml --out /shared/paper --address auto
      join the running Ray cluster instead of starting a local one
  instill tune configs/quickstart.yaml --out runs/qs-tuning
      Optuna search per method (same budget each) on validation data; writes runs/qs-tuning/tuned.yaml
  instill run configs/quickstart.yaml --out runs/qs-tuned --tuned runs/qs-tuning/tuned.yaml
      run the sweep with every method at its tuned values
  instill status runs/quickstart
      counts of done, pending and failed trials, and each failure's error
  instill report runs/quickstart
      rebuild the summary tables, plots and index.html in runs/quickstart/report/
  instill report runs/a runs/b --to runs/merged-report
      one report over several result directories
  instill analyse runs/quickstart --analyses NAME [NAME ...]
      add these analyses' columns to the finished rows, from the models kept by `keep: {models: true}`
"""

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instill",
        description="Reproducible sweeps of Subtask Induction and comparison methods on Ray Tune.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run (or resume) a sweep",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("sweep", type=Path, help="YAML sweep file")
    _add_set(run)
    run.add_argument(
        "--out",
        required=True,
        help="output directory, resumed if it holds this sweep: a path (shared by every node on a cluster) "
        "or an object-store URI (s3://bucket/prefix, gs://bucket/prefix)",
    )
    run.add_argument("--address", help="Ray cluster address ('auto' for the local cluster); default: start one")
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when no --address is given")
    run.add_argument("--force", action="store_true", help="run even if --out holds a sweep of another name")
    run.add_argument("--no-report", action="store_true", help="skip the summary table and plots")
    run.add_argument("--tuned", type=Path, help="per-method values from `instill tune` (its tuned.yaml)")
    run.add_argument(
        "--rerun-stale",
        action="store_true",
        help="also rerun finished trials whose rows came from another code version (git commit or package "
        "version, the row's code_version); their rows are replaced",
    )
    run.add_argument(
        "--tracking",
        choices=["wandb", "mlflow"],
        help="also log every trial's curves to W&B or MLflow (pip install 'instill[wandb]' / 'instill[mlflow]')",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=120.0,
        help="seconds running trials get to checkpoint after SIGINT/SIGTERM before the sweep stops at once",
    )

    tune = sub.add_parser("tune", help="Optuna search of each method's hyperparameters on validation data")
    tune.add_argument("sweep", type=Path)
    _add_set(tune)
    tune.add_argument("--out", type=Path, required=True, help="directory for tuned.yaml and the search's state")
    tune.add_argument("--address", help="Ray cluster address; default: start a local one")
    tune.add_argument("--num-cpus", type=int)

    validate = sub.add_parser("validate", help="check a sweep file and print its grid")
    validate.add_argument("sweep", type=Path)
    _add_set(validate)

    status = sub.add_parser("status", help="counts of done, pending and failed trials in an output directory")
    status.add_argument("out", help="output directory (path or URI)")

    analyse = sub.add_parser(
        "analyse", help="run more analyses on finished trials, from the models kept by `keep: {models: true}`"
    )
    analyse.add_argument("out", help="output directory (path or URI) of `instill run`")
    analyse.add_argument("--analyses", nargs="+", required=True, metavar="NAME", help="registered analyses to run")

    report = sub.add_parser("report", help="summary tables, plots and index.html of one or more output directories")
    report.add_argument("out", nargs="+", help="output directories (paths or URIs) of `instill run` (merged)")
    report.add_argument("--to", type=Path, help="local report directory (default: FIRST_OUT/report; needed for URIs)")
    report.add_argument(
        "--target", type=float, help="accuracy whose required budget is reported; default: report.target (0.9)"
    )
    report.add_argument(
        "--versus",
        metavar="METHOD|PATH=VALUE",
        action="append",
        help="also compare every series with its closest series of METHOD, or with its twin of the same method "
        "and settings but VALUE at config PATH (--versus model.name=gpt), paired by seed, as findings with "
        "verdicts (repeatable); default: the sweep's report.versus",
    )
    report.add_argument(
        "--margin",
        type=float,
        help="equivalence margin declared in advance: a difference whose interval lies inside +-MARGIN is "
        "'equivalent'; default: the sweep's report.margin, else none (never 'equivalent')",
    )
    report.add_argument(
        "--metric",
        action="append",
        metavar="COLUMN",
        help="also judge this summarised column with findings, besides test_acc (repeatable; with --versus), "
        "e.g. an analysis column; default: the sweep's report.metrics",
    )
    report.add_argument(
        "--mean-over", metavar="AXIS", help="also average the series that differ only in AXIS (e.g. model.n_layers)"
    )

    claims = sub.add_parser("check-claims", help="check each bold verdict in documents against its finding")
    claims.add_argument("files", nargs="+", type=Path, help="Markdown files (e.g. docs/*.md)")
    claims.add_argument(
        "--seeds", action="store_true", help="also list, per report folder, the cited findings' seed counts"
    )
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="PATH=VALUE",
        help="set a config path of the sweep file, the value read as YAML (repeatable): --set training.lr=0.004 "
        "--set 'seeds=[0, 1]'; bare PATH=VALUE arguments after the sweep file are the same; recorded in OUT/sweep.json",
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    bare = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if extra and (bare != extra or not hasattr(args, "overrides")):
        hint = "; set a config path with --set PATH=VALUE" if hasattr(args, "overrides") else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if bare:
        args.overrides += bare
    from orchestrator.config import ConfigError

    try:
        commands = {"run": _run, "validate": _validate, "status": _status, "report": _report, "tune": _tune}
        commands.update(analyse=_analyse, **{"check-claims": _check_claims})
        return commands[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _validate(args) -> int:
    from orchestrator.config import load_sweep_file
    from orchestrator.config.schema import SeedRule
    from orchestrator.trial import expand, upstream_keys

    sweep = load_sweep_file(args.sweep, args.overrides)
    specs = expand(sweep)
    artifacts: dict[str, set] = {}
    for spec in specs:
        for kind, key in upstream_keys(sweep, spec):
            artifacts.setdefault(kind, set()).add(key)
    print(f"{args.sweep}: valid sweep {sweep.name!r} (config hash {sweep.config_hash})")
    if args.overrides:
        print(f"  with --set {' '.join(args.overrides)}")
    print(f"  task {sweep.task.name}, model {sweep.model.name}")
    print(f"  methods {', '.join(sweep.methods)}")
    print(f"  seeds {sweep.seeds if isinstance(sweep.seeds, SeedRule) else list(sweep.seeds)}")
    print(f"  data fractions {list(sweep.data_fractions)}")
    for path, values in sweep.axes.items():
        print(f"  axis {path}: {list(values)}")
    for name, values in sweep.variants.items():
        changes = ", ".join(f"{path}={value}" for path, value in values.items()) or "the sweep as written"
        print(f"  variant {name}: {changes}")
    analyses = [name for name, _ in sweep.analysis_list()]
    print(f"  analyses {', '.join(analyses) or 'none'}")
    upstream = ", ".join(f"{len(keys)} {kind}" for kind, keys in artifacts.items()) or "no upstream artifacts"
    print(f"  {len(specs)} trials; {upstream}")
    return 0


def _run(args) -> int:
    from orchestrator.config import load_sweep_file
    from orchestrator.sweep import run_sweep

    sweep = load_sweep_file(args.sweep, args.overrides)
    if args.tuned or sweep.tuning.in_run:
        from orchestrator.tuning import apply_tuned

        sweep = apply_tuned(sweep, args.tuned or _tune_first(sweep, args))
    outcome = run_sweep(
        sweep,
        args.out,
        address=args.address,
        num_cpus=args.num_cpus,
        force=args.force,
        grace_s=args.grace,
        resume_hint=resume_command(args),
        tracking=args.tracking,
        rerun_stale=args.rerun_stale,
        overrides=args.overrides,
    )
    print(
        f"{outcome.ran} trials run, {outcome.skipped} already done, {outcome.failed} failed "
        f"in {outcome.wall_s:.0f} s; results: {outcome.out_dir}/results.parquet"
    )
    if outcome.skipped or outcome.stale:
        print(stale_line(outcome))
    _print_analysis_errors(outcome.table)
    if outcome.stopped_by is not None:
        _exit_at_next_signal()
        pending = int((outcome.table["status"] == "pending").sum())
        print(
            f"stopped by {signal.Signals(outcome.stopped_by).name}: {pending} trial(s) not finished "
            f"(interrupted ones resume from their checkpoints). Resume with:\n  {resume_command(args)}",
            file=sys.stderr,
        )
        return 128 + outcome.stopped_by
    if not args.no_report:
        from orchestrator.report import write_report

        if isinstance(outcome.out_dir, Path):
            r = sweep.report
            out = write_report([outcome.out_dir], target=r.target, versus=r.versus, over=r.mean_over, margin=r.margin,
                               metrics=r.metrics)  # fmt: skip
            _print_report(out)
        else:
            print(f"report: run `instill report {outcome.out_dir} --to DIR` to write it to a local directory")
    if outcome.failed:
        failed = outcome.table[outcome.table["status"] == "failed"]
        print(f"{len(failed)} trial(s) failed:", file=sys.stderr)
        for _, row in failed.iterrows():
            print(f"  {row['trial']}: {row['error']}", file=sys.stderr)
        return 1
    return 0


def stale_line(outcome) -> str:
    """How many finished rows came from other code versions than this one, and what to do."""
    from common.provenance import code_version

    here = f"this code version ({code_version()})"
    if outcome.rerun_stale:
        return f"{outcome.stale} finished trial(s) from other code versions than {here} run again"
    line = f"{outcome.stale} of {outcome.skipped} finished trial(s) came from other code versions than {here}"
    return line + ("; --rerun-stale reruns them" if outcome.stale else "")


def _tune_first(sweep, args) -> Path:
    """`tuning.in_run`: every method tuned on validation with the same budget, into
    OUT/tuning/<config hash>/ (kept: a resumed or extended run with the same config reuses it)."""
    from orchestrator.config import ConfigError
    from orchestrator.tuning import tune_methods

    if "://" in str(args.out):
        raise ConfigError("tuning.in_run tunes into OUT/tuning/, which needs a local --out; run `instill tune` and "
                          "pass its tuned.yaml with --tuned")  # fmt: skip
    folder = Path(args.out) / "tuning" / sweep.config_hash
    if (folder / "tuned.yaml").is_file():
        print(f"tuned values: {folder / 'tuned.yaml'} (tuned before, for this config)")
        return folder / "tuned.yaml"
    return tune_methods(sweep, folder, address=args.address, num_cpus=args.num_cpus)


def resume_command(args) -> str:
    """The `instill run` command line that resumes this run."""
    parts = ["instill", "run", str(args.sweep), "--out", str(args.out)]
    parts += [part for override in args.overrides for part in ("--set", override)]
    parts += ["--address", args.address] if args.address else []
    parts += ["--tuned", str(args.tuned)] if args.tuned else []
    parts += ["--force"] if args.force else []
    parts += ["--rerun-stale"] if args.rerun_stale else []
    parts += ["--tracking", args.tracking] if args.tracking else []
    return " ".join(shlex.quote(p) for p in parts)


def _tune(args) -> int:
    from orchestrator.config import load_sweep_file
    from orchestrator.tuning import tune_methods

    sweep = load_sweep_file(args.sweep, args.overrides)
    path = tune_methods(sweep, args.out, address=args.address, num_cpus=args.num_cpus)
    print(path.read_text())
    sets = "".join(f" --set {shlex.quote(override)}" for override in args.overrides)
    print(f"tuned values: {path}; use them with `instill run {args.sweep}{sets} --out DIR --tuned {path}`")
    return 0


def _status(args) -> int:
    from orchestrator.status import sweep_status

    print(sweep_status(args.out)[0])
    return 0


def _report(args) -> int:
    from orchestrator.outdir import read_sweep
    from orchestrator.report import write_report

    record, _ = read_sweep(args.out[0])  # the sweep's `report:` settings, where the options do not say
    settings = ((record or {}).get("config") or {}).get("report") or {}
    target = args.target if args.target is not None else settings.get("target", 0.9)
    margin = args.margin if args.margin is not None else settings.get("margin")
    versus, over = args.versus or settings.get("versus"), args.mean_over or settings.get("mean_over")
    metrics = args.metric or settings.get("metrics") or ()
    _print_report(write_report(args.out, args.to, target=target, versus=versus, over=over, margin=margin,
                               metrics=metrics))  # fmt: skip
    return 0


def _check_claims(args) -> int:
    from orchestrator.claims import check_files, cited, seeds_summary
    from orchestrator.report.statistics import FEW_SEEDS

    cache = {}  # each findings table read once, for both
    problems = check_files(args.files, cache)
    for problem in problems:
        print(problem)
    found = cited(args.files, cache)
    if args.seeds and not found.empty:
        by = found.groupby("report").agg(
            cited=("id", "size"), min_seeds=("seeds", "min"), max_seeds=("seeds", "max"),
            below=("few_seeds", "sum"),
        )  # fmt: skip
        print(by.rename(columns={"below": f"below_{FEW_SEEDS}"}).to_string())
    print(f"{len(args.files)} file(s): {len(problems)} claim(s) disagree with their findings or cite none")
    print(seeds_summary(found))
    return 1 if problems else 0


def _analyse(args) -> int:
    from orchestrator.analyse import analyse_sweep

    table = analyse_sweep(args.out, args.analyses)
    done = int((table["status"] == "done").sum())
    print(f"{', '.join(args.analyses)} added to {done} finished trial(s); instill report {args.out} updates the report")
    return 1 if _print_analysis_errors(table) else 0


def _print_analysis_errors(table) -> bool:
    from orchestrator.results import analysis_errors_line

    line = analysis_errors_line(zip(table["trial"], table["analysis_errors"], strict=True))
    if line:
        print(line, file=sys.stderr)
    return line is not None


def _print_report(report_dir: Path) -> None:
    print((report_dir / "summary.md").read_text())
    print(f"report: {report_dir}")


def _exit_at_next_signal() -> None:
    """After a graceful stop everything is written: another SIGINT/SIGTERM ends the process at once
    with 128 + its number (not a KeyboardInterrupt trace, or death by the signal)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))


if __name__ == "__main__":
    sys.exit(main())
