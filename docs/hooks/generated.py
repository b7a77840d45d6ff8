"""mkdocs hook: the pages that are generated at build time, so that they cannot drift from their source.

- reference/config.md: every key of conf/ with its default and the comment beside (or above) it
- reference/cli.md: what `python src/train.py --help` prints
- notebook.md: notebooks/chapter2.ipynb (committed executed) as Markdown, its figures beside it
- reference/layout.md: every module of src/, benchmarks/ and tests/ with the first sentence of its docstring
- changelog.md: the top-level CHANGELOG.md
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
NOTEBOOK = ROOT / "notebooks" / "chapter2.ipynb"

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.\-]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
COMMENT = re.compile(r"^(?P<indent> *)#\s?(?P<text>.*)$")


def parse_yaml(text: str) -> tuple[str, str | None, list[tuple[str, str, str]]]:
    """A conf/ file's header comment, its `# @package`, and (dotted key, default, meaning) per leaf key.

    conf/ is flat, commented YAML, one key per line (the project's convention), so a line parser suffices
    and, unlike a YAML library's round-trip, keeps the comments exactly where the file has them: a comment
    beside a key, the lines below it aligned with that comment, and a comment block above a key."""
    header: list[str] = []
    package = None
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    above: list[str] = []  # comment lines waiting for the next key
    last: list | None = None  # the last key's row, while comment lines may continue its comment
    last_col = -1
    seen_key = False
    in_list_of = -1  # indent of a key whose value is a block list (defaults:), skipped
    for line in text.splitlines():
        if not line.strip():
            last, above = None, ([] if seen_key else above)
            if not seen_key and header and header[-1] != "":
                header.append("")
            continue
        c = COMMENT.match(line)
        if c:
            text_ = c["text"]
            if text_.startswith("@package"):
                package = text_.split(None, 1)[1].strip()
                continue
            if last is not None and abs(len(c["indent"]) - last_col) <= 2:
                last[2] += " " + text_.strip()
            elif not seen_key:
                header.append(text_)
            else:
                above.append(text_.strip())
            continue
        if line.lstrip().startswith("- "):
            continue  # a list item (a defaults list)
        m = KEY.match(line)
        if not m:
            continue
        seen_key = True
        indent = len(m["indent"])
        if in_list_of >= 0 and indent > in_list_of:
            continue
        in_list_of = -1
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, value, comment = m["key"], m["value"].strip(), (m["comment"] or "").strip()
        meaning = " ".join(above + ([comment] if comment else []))
        above = []
        if key == "defaults":
            in_list_of = indent
            last = None
            continue
        path = ".".join([k for _, k in stack] + [key])
        if value == "":
            stack.append((indent, key))
            if meaning:  # a mapping's own comment: a row of its own
                rows.append([path, "", meaning])
                last, last_col = rows[-1], line.index("#") if "#" in line else -1
            else:
                last = None
            continue
        rows.append([path, value, meaning])
        last, last_col = rows[-1], (line.index("#") if comment else -1)
    return "\n".join(header).strip(), package, [tuple(r) for r in rows]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_page() -> str:
    out = [
        "# Configuration keys",
        "",
        "Generated from the comments in `conf/` when the site is built: each key with its default and the "
        "comment the file gives it. A group's option sets its keys under the group's name "
        "(`optimizer=adam` sets `optimizer.*`) unless its file says `# @package`. Any key is overridden "
        "on the command line as `key=value`; `python src/train.py --cfg job` prints what a command line "
        "composes.",
        "",
    ]
    train_header, _, train_rows = parse_yaml((CONF / "train.yaml").read_text())
    out += ["## train.yaml: the defaults", "", train_header.replace("\n", " "), "", *table(train_rows, "")]
    for group in ["data", "model", "optimizer", "batching"]:
        out += [f"## `{group}=`", ""]
        for f in sorted((CONF / group).glob("*.yaml")):
            header, package, rows = parse_yaml(f.read_text())
            prefix = "" if package == "_global_" else (package or group)
            out += [f"### `{group}={f.stem}`", "", f"`conf/{group}/{f.name}`. " + header.replace("\n", " "), ""]
            out += table(rows, prefix)
    out += [
        "## `experiment=`: the studies' presets",
        "",
        "Each preset is `# @package _global_`: it sets keys anywhere. Its header says what it studies and "
        "what it costs; its keys are in the file.",
        "",
    ]
    for f in sorted((CONF / "experiment").glob("*.yaml")):
        header, _, _ = parse_yaml(f.read_text())
        out += [f"### `experiment={f.stem}`", "", f"`conf/experiment/{f.name}`.", "", "```text", header, "```", ""]
    for sub, prefix in [("launcher", "hydra.launcher"), ("sweeper", "hydra.sweeper")]:
        for f in sorted((CONF / "hydra" / sub).glob("*.yaml")):
            header, _, rows = parse_yaml(f.read_text())
            out += [
                f"## `hydra/{sub}={f.stem}`",
                "",
                f"`conf/hydra/{sub}/{f.name}`.",
                "",
                "```text",
                header,
                "```",
                "",
                *table(rows, prefix),
            ]
    return "\n".join(out) + "\n"


def table(rows, prefix: str) -> list[str]:
    if not rows:
        return []
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, value, meaning in rows:
        full = f"{prefix}.{key}" if prefix and not key.startswith("_") else key
        if key.startswith("_"):  # _target_, _partial_: the class the option builds
            full = key
        lines.append(f"| `{cell(full)}` | {('`' + cell(value) + '`') if value else ''} | {cell(meaning)} |")
    return lines + [""]


def cli_page() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the help shows the default store, not the builder's
    text = subprocess.run(
        [sys.executable, "src/train.py", "--help"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout
    return (
        "# Command line: `--help`\n\nWhat `python src/train.py --help` prints, captured when the site was "
        "built (its text is `conf/hydra/help/descent.yaml`, Hydra's help template; "
        "`python src/train.py optimizer=sgd --help` shows that option's values in the config part). "
        "Hydra's own flags: `python src/train.py --hydra-help`.\n\n```text\n" + text + "```\n"
    )


def notebook_files(config) -> list[File]:
    """The executed notebook as Markdown (nbconvert), its image outputs as files beside it."""
    import nbformat
    from nbconvert import MarkdownExporter

    nb = nbformat.read(NOTEBOOK, as_version=4)
    body, resources = MarkdownExporter().from_notebook_node(nb, resources={"output_files_dir": "notebook_files"})
    head = (
        '!!! note "The notebook"\n    `notebooks/chapter2.ipynb` (paired with `notebooks/chapter2.py` by '
        "jupytext), as last executed and committed; `tests/test_notebook.py` executes it on small data. "
        "Open it with `jupyter lab notebooks/chapter2.ipynb` (or run the `.py` cell by cell).\n\n"
    )
    files = [File.generated(config, "notebook.md", content=head + body)]
    for name, data in resources.get("outputs", {}).items():
        files.append(File.generated(config, name, content=data))
    return files


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    para = " ".join(doc.split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)(?<!\bch)\.\s+(?=[A-Z`(])", para)  # not "et al. 2018", "ch. 2"
    return (para[: end.start() + 1] if end else para).strip()


LAYOUT_TOP = [
    ("pyproject.toml", "the package, its dependencies and extras (what `make train` and `make test` install)"),
    ("Makefile", "`make train`, `test`, `docs`, `ui`, `server`, `ray`, `slurm`, `bench` and their `-stop`s"),
    ("mkdocs.yml", "this site; `docs/hooks/generated.py` generates its reference pages"),
    ("conf/", "`train.yaml` and one folder per config group: [the configuration reference](config.md)"),
    ("docs/", "this site's pages, the studies' figures and reports"),
    ("notebooks/", "`chapter2.py` (jupytext) and its executed `chapter2.ipynb`: [the notebook](../notebook.md)"),
    (
        "src/hydra_plugins/descent_optuna_sweeper/",
        "descent's port of Hydra's Optuna sweeper (MIT, upstream's "
        "licence kept; its `__init__.py` says what it changes and which release replaces it)",
    ),
    ("outputs/", "Hydra's run and sweep folders (kept empty in git)"),
    (".ci/run", "what CI runs: `make test`, then `mkdocs build --strict`"),
    (
        "tests/",
        "pytest, one file per concern: the real `conf/`, real subprocesses, real MLflow stores: "
        "[tests and CI](../development/tests.md)",
    ),
]


def layout_page() -> str:
    out = [
        "# Layout",
        "",
        "Generated from the tree when the site is built: each module with the first sentence of its docstring.",
        "",
        "| path | what |",
        "|---|---|",
    ]
    out += [f"| `{p}` | {w} |" for p, w in LAYOUT_TOP]
    for pattern in ["src/*.py", "src/descent/**/*.py", "src/hydra_plugins/*/__init__.py", "benchmarks/*.py"]:
        for f in sorted(ROOT.glob(pattern)):
            rel = f.relative_to(ROOT).as_posix()
            what = first_sentence(f)
            if not what and f.name == "__init__.py":
                continue
            out.append(f"| `{rel}` | {cell(what)} |")
    return "\n".join(out) + "\n"


def on_files(files, config):
    files.append(File.generated(config, "reference/layout.md", content=layout_page()))
    files.append(File.generated(config, "reference/config.md", content=config_page()))
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    for f in notebook_files(config):
        files.append(f)
    return files


__all__ = ["on_files", "parse_yaml"]
