"""Convergence report over MLflow runs: curves and a table per configuration.  `python src/compare.py --help`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plot validation loss/accuracy against epochs, updates and seconds, and tabulate final "
        "metrics and time to a target accuracy, one line per configuration (mean over seeds). "
        "Writes convergence.png, .md and .csv, and logs them to the sweep's parent run."
    )
    parser.add_argument(
        "--experiment",
        default="descent",
        help="MLflow experiment: report its latest sweep, or all its runs if it has none (default: descent)",
    )
    parser.add_argument("--parent", metavar="RUN_ID", help="report the children of this sweep (parent) run instead")
    parser.add_argument(
        "--target-acc",
        type=float,
        default=0.97,
        help="target validation accuracy for the time-to-target columns (default: 0.97; "
        "training accuracy when no run has validation data)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="output folder (default: the sweep's folder, else outputs/reports/<timestamp>/)"
    )
    parser.add_argument(
        "--pictures",
        metavar="NAME",
        choices=("local_minima", "step_size", "edge_of_stability"),
        help="also draw this preset's figure (descent/reports/pictures.py) for the sweep --parent names",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="the batch-size scaling report of an experiment=batch_scaling sweep instead: per optimizer, "
        "batch size and target, the seeds' median updates and examples at the rate chosen on the "
        "first seed; per optimizer and target the fit S = S_min + E_min/B and B_crit with 95 %% "
        "bootstrap intervals over seeds, beside B_simple of the reference run (scaling.png, .md, "
        ".csv; metrics scaling.<what>.<optimizer>.<target> on the sweep's parent run)",
    )
    parser.add_argument(
        "--with",
        dest="more",
        metavar="RUN_ID",
        action="append",
        default=[],
        help="with --scaling: also the trials of this sweep (parent) run, e.g. another study's "
        "learning rates for the same cells; repeatable",
    )
    parser.add_argument(
        "--trials",
        metavar="CSV",
        action="append",
        default=[],
        help="with --scaling: also the trials in this scaling_trials.csv (which every scaling report writes: "
        "every trial's cell, rate, seed and crossings); without --parent, a report of these files alone, "
        "no MLflow store needed; repeatable",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    args = parser.parse_args(argv)
    if args.pictures and not args.parent:
        parser.error("--pictures needs --parent RUN_ID (the sweep's run)")
    if args.more and not args.scaling:
        parser.error("--with joins another sweep's trials to a --scaling report only")
    if args.trials and not args.scaling:
        parser.error("--trials joins saved trials to a --scaling report only")

    from descent.reports import (
        convergence as report,
    )  # mlflow and matplotlib: only once the command line is known to be good

    try:
        if args.scaling:
            from descent.reports.scaling import make_scaling_report

            paths = make_scaling_report(
                args.tracking_uri, args.parent, args.out, args.experiment, tuple(args.more), tuple(args.trials)
            )
            paths.pop("summary")
        else:
            paths = report.make_report(args.tracking_uri, args.parent, args.experiment, args.out, args.target_acc)
    except report.ReportError as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 2
    if args.pictures:
        from descent.reports import pictures

        paths |= {
            f"{args.pictures}_{k}": v
            for k, v in pictures.make(
                args.pictures, args.tracking_uri, args.parent, args.out or paths["md"].parent
            ).items()
        }
    for path in paths.values():
        print(path)
    print()
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
