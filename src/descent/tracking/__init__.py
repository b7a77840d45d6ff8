"""tracking/: MLflow: the store and its lookups, the logger, what a run records (data, machine, model)."""
