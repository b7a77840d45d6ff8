# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 with descent
#
# *Deep Learning with Python*, chapter 2, walked through with descent: the book's first network, then the
# chapter's question about gradient descent (one update per pass over the data, or one per example, or one
# per mini-batch), the curves read back from MLflow, and the ball that momentum rolls past a local minimum.
#
# Every run here is `python src/train.py ...`, exactly as typed in a terminal, on a subset of MNIST so that
# the notebook runs in a few minutes on a CPU. The runs and their files go to `outputs/notebook/`
# (`DESCENT_NOTEBOOK_OUT` elsewhere), with their own MLflow store there (`MLFLOW_TRACKING_URI` when set):
# `MLFLOW_TRACKING_URI=sqlite:///outputs/notebook/mlflow.db make ui` shows them.

# %%
import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

warnings.filterwarnings("ignore", "IProgress not found")  # tqdm (through mlflow) asks for ipywidgets; no bars here
from mlflow import MlflowClient  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # the project's folder
os.chdir(ROOT)  # where `python src/train.py` is typed: data/, outputs/ and relative stores mean the same here
OUT = Path(os.environ.get("DESCENT_NOTEBOOK_OUT", "outputs/notebook"))  # runs, sweeps, reports
STORE = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{OUT}/mlflow.db")
SMALL = os.environ.get("DESCENT_NOTEBOOK_SMALL") == "1"  # the test suite's size: fewer examples and passes
N_TRAIN = 2000 if SMALL else 10000  # training examples: the first N of MNIST's 60000 (data.limit_train)
N_VAL = 500 if SMALL else 2000  # held out for validation, the last ones (data.val_size)
EPOCHS = 2 if SMALL else 5  # passes over the N_TRAIN examples
OUT.mkdir(parents=True, exist_ok=True)
client = MlflowClient(STORE)


def train(*overrides: str, multirun: bool = False) -> str:
    """`python src/train.py [-m] overrides...` in the project's folder; prints its last lines, returns its output."""
    command = [sys.executable, "src/train.py", *(["-m"] if multirun else []), *overrides]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": STORE,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    print("\n".join(out.strip().splitlines()[-12:]))
    if done.returncode != 0:
        raise RuntimeError(f"train.py exited {done.returncode}")
    return out


# %% [markdown]
# ## 1. The book's run
#
# The listing of the book's 1st edition: MNIST, `Dense(512, relu) -> Dense(10, softmax)`, `rmsprop`,
# categorical crossentropy, batch 128, 5 epochs. `python src/train.py` with no arguments is that run on all
# 60000 images; here on the first `N_TRAIN`. The 3rd edition's chapter 2 compiles the same network with
# `adam`: `python src/train.py optimizer=adam`.

# %%
out = train(f"data.limit_train={N_TRAIN}", "logger.experiment_name=notebook-seed", f"hydra.run.dir={OUT}/runs/seed")

# %% [markdown]
# The run is in MLflow: its params (each config group's choice, the resolved config), its metrics (every
# one at step = training examples seen) and its artifacts (`config.yaml`, `train_image_4.png`, the
# checkpoint, the model). `MlflowClient` reads them back:

# %%
experiment = client.get_experiment_by_name("notebook-seed")
[seed_run] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
print(seed_run.info.run_name, seed_run.info.status)
print({k: seed_run.data.params[k] for k in ("optimizer", "batching", "optimizer.lr", "data.batch_size")})
print({k: round(v, 4) for k, v in seed_run.data.metrics.items() if k.startswith(("test/", "train/"))})

# %% [markdown]
# ## 2. Batch gradient descent, mini-batch SGD, online SGD
#
# The chapter: *batch* gradient descent computes the gradient over all training examples for one update;
# *stochastic* gradient descent over one example (online) or a small batch (mini-batch). Which converges
# faster? The preset `experiment=gd_vs_sgd` runs plain SGD in the three regimes, each at its own searched
# learning rate, with the same budget in examples; here on `N_TRAIN` examples and one seed.

# %%
out = train(
    "experiment=gd_vs_sgd",
    f"data.limit_train={N_TRAIN}",
    f"data.val_size={N_VAL}",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.val_every_examples=500",
    "hydra.sweeper.params.seed=0",
    "logger.experiment_name=notebook-gd-vs-sgd",
    "logger.log_model=false",
    f"hydra.sweep.dir={OUT}/gd_vs_sgd",
    multirun=True,
)

# %% [markdown]
# The sweep is one parent run with one child per regime. Each child's `val/loss` is logged at step =
# training examples seen, so the three regimes share an x-axis; `progress/updates` at the same steps gives
# the optimizer updates behind each point.

# %%
experiment = client.get_experiment_by_name("notebook-gd-vs-sgd")
[parent] = client.search_runs(
    [experiment.experiment_id], "tags.`descent.sweep` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
)
children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def history(run, key):
    points = client.get_metric_history(run.info.run_id, key)
    return np.array([p.step for p in points]), np.array([p.value for p in points])


fig, (by_examples, by_updates) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for run in sorted(children, key=lambda r: r.data.params["batching"]):
    steps, loss = history(run, "val/loss")
    update_steps, updates = history(run, "progress/updates")
    label = f"{run.data.params['batching']} (lr {float(run.data.params['optimizer.lr']):g})"
    by_examples.plot(steps, loss, "o-", ms=3, label=label)
    by_updates.plot(np.interp(steps, update_steps, updates), loss, "o-", ms=3, label=label)
by_examples.set(
    xlabel="training examples seen", ylabel="validation loss", yscale="log", title="per example: SGD is far ahead"
)
by_updates.set(xlabel="optimizer updates", xscale="log", title="per update: a full-batch step is the better step")
by_examples.legend()
plt.tight_layout()
plt.show()

for run in sorted(children, key=lambda r: r.data.params["batching"]):
    m = run.data.metrics
    print(
        f"{run.data.params['batching']:>6}: {int(m['progress/updates']):>6} updates, "
        f"val/acc {m['val/acc']:.3f}, test/acc {m['test/acc']:.3f}"
    )

# %% [markdown]
# The sweep also wrote its report, `convergence.png` and `convergence.md` in its folder (`OUT/gd_vs_sgd/`)
# and on the parent run under `report/`. On all of MNIST with 3 seeds (`python src/train.py -m
# experiment=gd_vs_sgd`) the study's page in the docs gives the numbers and how far to trust them.

# %%
print((OUT / "gd_vs_sgd" / "convergence.md").read_text().split("\n\n")[2])

# %% [markdown]
# ## 3. A ball past a local minimum
#
# The chapter pictures momentum as a ball rolling down the loss curve: with enough speed it rolls past a
# local minimum into a deeper one. `model=double_well` is one parameter w on f(w) = w⁴/4 − w²/2 − w/4: a
# local minimum at w = −0.838, the global one at 1.107. Starting from w = −2, plain SGD and SGD with
# momentum 0.9 at the same learning rate, 1000 updates with the exact gradient (`data=toy`), w logged at
# every update (`toy/w`):

# %%
out = train(
    "data=toy",
    "model=double_well",
    "batching=online",
    "optimizer=sgd,sgd_momentum",
    "optimizer.lr=0.01",
    "trainer.max_epochs=1",
    "trainer.val_every_examples=1",
    "logger.experiment_name=notebook-ball",
    f"hydra.sweep.dir={OUT}/ball",
    multirun=True,
)

# %%
experiment = client.get_experiment_by_name("notebook-ball")
[parent] = client.search_runs(
    [experiment.experiment_id], "tags.`descent.sweep` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
)
balls = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

w = np.linspace(-2.2, 1.8, 400)
fig, (curve, path) = plt.subplots(1, 2, figsize=(11, 4))
curve.plot(w, w**4 / 4 - w**2 / 2 - w / 4, color="grey")
for run in sorted(balls, key=lambda r: r.data.params["optimizer"]):
    steps, ws = history(run, "toy/w")
    name = run.data.params["optimizer"]
    curve.plot(ws, ws**4 / 4 - ws**2 / 2 - ws / 4, ".", ms=3, label=name)
    path.plot(steps, ws, label=name)
    print(f"{name}: ends at w = {ws[-1]:.3f}")
curve.set(xlabel="w", ylabel="f(w)", title="the double well and each path on it")
path.axhline(-0.838, ls=":", color="grey")
path.axhline(1.107, ls="--", color="grey")
path.set(xlabel="updates", ylabel="w", title="w against updates (dotted: local, dashed: global minimum)")
curve.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Plain SGD stops in the local minimum; momentum 0.9 carries the ball over the barrier into the global one.
# The full study (`python src/train.py -m experiment=local_minima`: momentum 0 to 0.95, with and without
# gradient noise, 3 seeds) is one of the docs' study pages.
