"""What a sweep's parent run says on its MLflow page: its description (the preset's question, the command, the keys
its jobs vary, the reports' headline tables), and its best child (by sweep.objective; its model aliased `best`)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from descent.tracking import names

NOTE_LIMIT = 8000  # MLflow's longest tag value


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep's jobs differ in: the command line's sweeps (a,b / range(...)) and hydra.sweeper.params."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return list(dict.fromkeys([*keys, *params]))


def preset_question(config: DictConfig) -> str | None:
    """The first paragraph of the chosen preset's opening comment (conf/experiment/<name>.yaml): its question."""
    name = OmegaConf.select(config, "hydra.runtime.choices.experiment")
    if not name:
        return None
    for source in OmegaConf.select(config, "hydra.runtime.config_sources") or []:
        if source.get("schema") != "file":
            continue
        path = Path(source.path) / "experiment" / f"{name}.yaml"
        if path.is_file():
            lines = []
            for line in path.read_text().splitlines():
                if not line.startswith("#") or line.startswith("# @package"):
                    if lines:
                        break
                    continue
                text = line[1:].strip()
                if not text:
                    if lines:
                        break
                    continue
                lines.append(text)
            return " ".join(lines) or None
    return None


def parent_note(config: DictConfig, keys: list[str], argv: list[str]) -> str:
    """A sweep's description at its start: its question, the command that ran it, what its jobs vary."""
    question = preset_question(config)
    command = shlex.join(["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]])
    varies = ", ".join(f"`{k}`" for k in keys) or "nothing (one job per seed or repeat)"
    what = f"**{question}**" if question else f"A sweep over {varies}."
    return f"{what}\n\nCommand: `{command}`\n\nIts jobs vary {varies}; each job is a child run."


def headline(md: str) -> str:
    """A report's headline table, as Markdown: its table lines."""
    return "\n".join(line for line in md.splitlines() if line.startswith("|"))


def best_child(client, parent_id: str, objective: str, direction: str):
    """The sweep's finished child with the best objective (its last value, what train.py returned), or None."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs(
        [experiment_id], f"tags.`{names.PARENT}` = '{parent_id}' and attributes.status = 'FINISHED'", max_results=50000
    )
    scored = [
        (r.data.metrics[objective], r)
        for r in children
        if objective in r.data.metrics
        and r.data.metrics[objective] == r.data.metrics[objective]
        and r.data.tags.get(names.TRIAL_STATE, "COMPLETE") == "COMPLETE"
    ]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda vr: vr[0])[1]


def alias_best(client, name: str, run) -> str | None:
    """The alias `best` of registered model `name` on the version the run logged; its version, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version)).version
    client.set_registered_model_alias(name, "best", version)
    return version
