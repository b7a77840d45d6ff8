"""How to extend, proven (docs/internals/layout.md): a new measurement and its metric are one module in
descent/measure/ and one line in descent/tracking/names.py; the config names the measurement by its
_target_ under trainer.measures. Here both files are written into a copy of the project, and the copy's own
src/train.py runs it through the real loop on a small MNIST subset; the metric is read back with MlflowClient."""

from __future__ import annotations

import shutil
import os
import subprocess

from mlflow import MlflowClient

from conftest import ROOT, command, sqlite_store

MEASURE = '''"""The weights' L2 norm at each validation point."""

import torch

from descent.tracking import names


class WeightNorm:
    def __init__(self, every: int = 1):
        self.every = every

    def __call__(self, point) -> dict[str, float]:
        if point.updates % self.every:
            return {}
        return {names.WEIGHT_NORM: float(torch.sqrt(sum(p.detach().square().sum() for p in point.net.parameters())))}
'''
NAME = 'WEIGHT_NORM = "weights/norm"  # the weights\' L2 norm (descent/measure/weight_norm.py)\n'


def test_a_measurement_and_its_metric_are_added_in_two_files(tmp_path):
    copy = tmp_path / "project"
    for part in ("src", "conf"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "src" / "descent" / "measure" / "weight_norm.py").write_text(MEASURE)  # file 1: the measurement
    with open(copy / "src" / "descent" / "tracking" / "names.py", "a") as f:  # file 2: its metric's name
        f.write(NAME)
    store = sqlite_store(tmp_path)
    args = command(
        "data.limit_train=512",
        "data.val_size=128",
        "trainer.max_epochs=1",
        "trainer.val_every_examples=128",
        "+trainer.measures.weight_norm._target_=descent.measure.weight_norm.WeightNorm",
        cwd=tmp_path,
    )
    args[1] = str(copy / "src" / "train.py")  # the copy's entry point, which imports the copy's package
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": store}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "weights/norm"), key=lambda m: m.step)
    val = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [m.step for m in val] and len(history) >= 4  # at every validation point
    assert all(m.value > 1 for m in history) and history[0].value != history[-1].value  # the weights move
