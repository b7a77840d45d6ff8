"""Every metric, tag and study attribute name descent writes or reads: grep this file to see what a run records.

A name used by more than one module lives here and nowhere else (tests/test_layout.py greps src/ for metric strings
outside this file). Metrics are logged at step = training examples seen; docs/reference/mlflow-record.md explains them.
No import here beyond the standard library: the reports and the sweep's driver read it in a second of start-up.
"""

from __future__ import annotations

# --- metrics of a run (step = examples seen) ---------------------------------------------------------------------
TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"  # means over the examples since the last log point
VAL_LOSS, VAL_ACC = "val/loss", "val/acc"  # on the held-out examples (data.val_size)
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"  # once, at the end
EPOCH = "progress/epoch"  # fractional epochs
UPDATES = "progress/updates"  # optimizer updates so far
SECONDS = "progress/seconds"  # training wall time so far (checks and logging excluded)
EVALUATIONS = "progress/evaluations"  # the batches' loss and gradient evaluated (a closure: as often as it asks)
TRAIN, VAL, TEST, SYSTEM = "train/", "val/", "test/", "system/"  # prefixes (SYSTEM: MLflow's system metrics)

# the best value so far, logged when it improves: best/val_loss, best/val_acc, best/train_loss
BEST = "best/"


def best_key(key: str) -> str:
    return BEST + key.replace("/", "_")  # val/loss -> best/val_loss


# the first crossing of each target (val/acc >= acc): target/updates/0.97, target/examples/0.97, target/seconds/0.97
TARGET = "target/"
TARGET_UPDATES, TARGET_EXAMPLES, TARGET_SECONDS = "target/updates", "target/examples", "target/seconds"


def target_key(what: str, acc: float) -> str:
    """target/updates/0.97: `what` is updates, examples or seconds."""
    return f"{TARGET}{what}/{acc:g}"


# the gradient noise scale (descent/measure/noise.py)
NOISE_GRAD_SQ, NOISE_TRACE_COV = "noise/grad_sq", "noise/trace_cov"  # |G|^2 and tr(Σ) (EMA)
NOISE_B_SIMPLE, NOISE_B_SIMPLE_SE = "noise/b_simple", "noise/b_simple_se"  # tr(Σ)/|G|^2 and its standard error

# B_noise = tr(HΣ)/(GᵀHG) and the preconditioned scale tr(PΣ)/(GᵀPG) at the target crossings (measure/curvature_noise.py)
B_NOISE, B_NOISE_SE = "noise/b_noise", "noise/b_noise_se"
GRAD_H_GRAD, TRACE_H_COV = "noise/grad_h_grad", "noise/trace_h_cov"  # Gᵀ H G and tr(H Σ)
B_PRECOND, B_PRECOND_SE = "noise/b_precond", "noise/b_precond_se"
GRAD_P_GRAD, TRACE_P_COV = "noise/grad_p_grad", "noise/trace_p_cov"  # Gᵀ P G and tr(P Σ)


def noise_at_key(what: str, acc: float) -> str:
    """noise/b_simple/0.97: a noise measurement at a target's first crossing (trainer.noise_at_targets)."""
    return f"noise/{what}/{acc:g}"


# sharpness (descent/measure/sharpness.py)
SHARPNESS, SHARPNESS_THRESHOLD = "sharpness/lambda_max", "sharpness/threshold"  # λ_max and 2/η (momentum: (2+2β)/η)

# a toy loss's point and step (descent/measure/toy.py)
TOY = "toy/"
TOY_STEP = "toy/step"


def toy_key(coordinate: str) -> str:
    return f"{TOY}{coordinate}"  # toy/w, toy/x, toy/y


# --- metrics of a sweep's parent run -------------------------------------------------------------------------------
OPTUNA_BEST_VALUE = "optuna/best_value"  # a study's best objective (step = trials so far)


def scaling_key(what: str, optimizer: str, acc: float | None = None) -> str:
    """scaling.b_crit.sgd.0.97 (the batch-size scaling report's fit at one target); without acc: at the highest."""
    return f"scaling.{what}.{optimizer}" + ("" if acc is None else f".{acc:g}")


# --- tags ----------------------------------------------------------------------------------------------------------
PARENT = "mlflow.parentRunId"  # a sweep's child names its parent run
NOTE = "mlflow.note.content"  # a run's description on its page
KIND, KIND_VALUE = "mlflow.experimentKind", "custom_model_development"  # the UI opens on the runs table
GIT_COMMIT = "mlflow.source.git.commit"
SWEEP = "descent.sweep"  # "true" on a sweep's parent run
SWEEP_DIR = "hydra.sweep.dir"  # the sweep's folder, on the parent and each child
SWEEP_KEY = "descent.sweep.key"  # what a parent run is found by when the driver restarts
SWEEP_VARIES = "descent.sweep.varies"  # on the parent: the keys its jobs differ in
SWEEP_BEST = "descent.sweep.best_run"  # on the parent: the best child's run id
ENDED_BY = "descent.ended_by"  # "sweep": a child the sweep's end closed
LR_SOURCE = "lr.source"  # a preset's rate for a data/model it has no searched rate for
RESUME_OVERRIDES = "resume.overrides"  # a resumed run's overrides that differ from the first run's
STUDY = "optuna.study"  # a study's name on its runs
JOB_NUM = "hydra.job.num"  # a sweep's child: its job number (the report's order)
OUTPUT_DIR = "hydra.output_dir"  # a run's output folder on the machine that ran it
DIVERGED = "diverged"  # "true" on a run whose loss became non-finite
DIVERGED_EXAMPLES, DIVERGED_UPDATES = "diverged.examples", "diverged.updates"  # where it did
# an Optuna study: on its trials' runs
TRIAL, TRIAL_STATE, TRIAL_PRUNED = "optuna.trial", "optuna.state", "optuna.pruned"
# ... and on its parent run (descent/sweep/driver.py)
STUDY_STORAGE, STUDY_GRID = "optuna.storage", "optuna.grid"
STUDY_OBJECTIVE, STUDY_DIRECTION = "optuna.objective", "optuna.direction"
STUDY_SAMPLER, STUDY_SAMPLER_SEED, STUDY_PRUNER = "optuna.sampler", "optuna.sampler.seed", "optuna.pruner"
STUDY_N_TRIALS, STUDY_TRIALS = "optuna.n_trials", "optuna.trials"  # asked for; run (optuna.trials.COMPLETE: by state)
STUDY_BEST_TRIAL, STUDY_BEST_VALUE, STUDY_BEST_PARAMS = "optuna.best_trial", "optuna.best_value", "optuna.best_params"
STUDY_BEST = "optuna.best."  # a grid's study: optuna.best.<its cell>

# --- Optuna study and trial attributes (the batch-size protocol, descent/sweep/protocol.py) -----------------------
ROLE, PRUNE, CELL = "descent.role", "descent.prune", "descent.cell"
STOP = "descent.stop"  # a trial's highest target (a seed run's: the highest its rate was chosen for)
INTERRUPTED = "descent.interrupted"  # a trial whose command died under it: run again
BOUND = "descent.bound"  # a search trial's deadline ({"0.95": updates}): from the next smaller cell

# --- params a run records beside its config ---------------------------------------------------------------------
TRAIN_EXAMPLES = "data.train_examples"  # the training examples after the split (batching=full's batch)
