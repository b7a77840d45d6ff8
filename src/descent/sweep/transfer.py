"""A study's Optuna state as a text file, and back: take a long study to another machine, or keep it beside the
results it produced.

    python -m descent.sweep.transfer export optuna.db study.jsonl            # every study in the storage
    python -m descent.sweep.transfer export optuna.db study.jsonl --study batch_scaling-adam-16
    python -m descent.sweep.transfer import study.jsonl optuna.db            # then the same command goes on

The file is Optuna's journal (optuna.storages.JournalStorage with a JournalFileBackend: one JSON line per
operation, about 1 kB per trial); both directions are optuna.copy_study, so a trial keeps its rate, seed,
state, value and user attributes (the crossings the batch-size protocol decides from). A trial that was running
when it was exported arrives RUNNING; the sweeper marks it FAIL at its next start and the protocol asks again.
The MLflow runs stay where they ran: the scaling report's scaling_trials.csv carries them
(`python src/compare.py --scaling --trials FILE`).

A storage is a path to an SQLite file (optuna.db) or any URL Optuna takes (postgresql+psycopg2://...). Import
refuses a study the destination already has: two copies of a study's trials in one storage would run the
protocol on a mix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class TransferError(Exception):
    """A file, storage or study that cannot be used, said in one line."""


def storage_url(where: str) -> str:
    """A database URL as given; a path as an SQLite URL (absolute: Optuna resolves nothing)."""
    return where if "://" in where else f"sqlite:///{Path(where).absolute()}"


def journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def names(storage) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def copy(source, target, studies: list[str] | None, what: str) -> list[str]:
    """Every study of source (or those named) into target; their names. TransferError before anything is
    copied when a study is not in source or already in target."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    have = names(source)
    wanted = studies or have
    unknown = [s for s in wanted if s not in have]
    if unknown:
        raise TransferError(f"--study {', '.join(unknown)}: not in {what}; it has " + (", ".join(have) or "no study"))
    if not wanted:
        raise TransferError(f"{what}: no study to copy")
    clash = [s for s in wanted if s in names(target)]
    if clash:
        raise TransferError(
            f"{', '.join(clash)}: already in the destination; import into a storage without "
            "them (or delete them there: optuna delete-study --study-name NAME --storage URL)"
        )
    for name in wanted:
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
    return wanted


def export(storage: str, path: Path, studies: list[str] | None = None) -> list[str]:
    url = storage_url(storage)
    if "://" not in storage and not Path(storage).is_file():
        raise TransferError(f"{storage}: no such file (an Optuna storage: optuna.db, or a database URL)")
    if path.exists():
        raise TransferError(f"{path}: exists; export writes a new file (move the old one first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return copy(url, journal(path), studies, storage)
    except TransferError:
        path.unlink(missing_ok=True)
        raise


def load(path: Path, storage: str, studies: list[str] | None = None) -> list[str]:
    if not path.is_file():
        raise TransferError(f"{path}: no such file (a study file written by `export`)")
    return copy(journal(path), storage_url(storage), studies, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m descent.sweep.transfer",
        description="Copy Optuna studies from a storage into a text file (Optuna's journal) and back.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("export", help="storage -> new study file")
    out.add_argument("storage", help="optuna.db (a path) or a database URL")
    out.add_argument("file", type=Path, help="the study file to write (.jsonl)")
    into = sub.add_parser("import", help="study file -> storage (made if new)")
    into.add_argument("file", type=Path, help="a study file written by export")
    into.add_argument("storage", help="optuna.db (a path) or a database URL")
    for p in (out, into):
        p.add_argument("--study", action="append", help="only this study (repeatable); default: every one")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            done = export(args.storage, args.file, args.study)
        else:
            done = load(args.file, args.storage, args.study)
    except TransferError as e:
        print(f"transfer: {e}", file=sys.stderr)
        return 2
    for name in done:
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
