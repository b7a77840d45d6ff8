"""sweep/: multiruns: the job side (trial, pruning, targets), the driver's callback (parent run, report), the study protocol."""
