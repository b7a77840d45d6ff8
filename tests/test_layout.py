"""One registry of metric and tag names: no module of src/ spells a metric or tag name outside
src/descent/tracking/names.py (a renamed metric would otherwise break its readers silently). Docstrings and
comments may name them; code takes them from the registry. The vendored plugin (src/hydra_plugins) keeps
upstream's text."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from descent.tracking import names

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "src" / "descent" / "tracking" / "names.py"
VENDORED = ROOT / "src" / "hydra_plugins"
# a metric name, or its first part in an f-string: train/loss, noise/b_simple/{acc}, f"{names.TARGET}..." aside
METRIC = re.compile(r"^(train|val|test|progress|noise|sharpness|best|target|toy|system|optuna|scaling)/")
# every tag and attribute name the registry holds (mlflow.parentRunId, descent.sweep, optuna.study, ...)
TAGS = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and "." in v and "/" not in v}


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_names(path: Path) -> list[str]:
    """file:line: the string for each metric or tag name written out in the module's code."""
    tree = ast.parse(path.read_text(), str(path))
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        text = node.value
        if METRIC.match(text) or text in TAGS or any(f"`{tag}`" in text for tag in TAGS):
            found.append(
                (
                    node.lineno,
                    f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}: {text!r}",
                )
            )
    return [hit for _, hit in sorted(found)]


def test_metric_and_tag_names_come_from_the_registry():
    modules = [p for p in sorted((ROOT / "src").rglob("*.py")) if p != REGISTRY and VENDORED not in p.parents]
    assert len(modules) > 40  # the whole package is scanned
    found = [hit for p in modules for hit in spelled_names(p)]
    assert not found, "metric or tag names spelled outside descent/tracking/names.py:\n" + "\n".join(found)


def test_the_scan_finds_a_spelled_name(tmp_path):
    # the check itself: a module that writes a metric, a tag and a query by hand is caught, line by line
    module = tmp_path / "src" / "m.py"
    module.parent.mkdir()
    module.write_text(
        '"""Logs val/loss."""\nlog({"val/loss": 1.0})\ntag("mlflow.parentRunId")\n'
        'q = f"tags.`descent.sweep` = \'{x}\'"\nkey = f"noise/{what}/{acc:g}"\n'
    )
    assert [hit.split(":")[1] for hit in spelled_names(module)] == ["2", "3", "4", "5"]
