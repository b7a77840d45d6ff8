"""reports/: what is drawn and tabulated from MLflow runs: convergence, scaling, the chapter's pictures, a run's errors."""
