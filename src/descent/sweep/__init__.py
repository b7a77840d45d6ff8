"""sweep/: multiruns: the job side (trial, pruning, targets), the driver's callback (parent run, report), the study
protocol, a study's Optuna state to a file and back (transfer.py)."""
