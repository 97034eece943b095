"""MLflow tracking: the store (store), runs (runs), metrics (metrics)."""
