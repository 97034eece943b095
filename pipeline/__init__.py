"""The Hydra/MLflow/DVC pipeline around birnn: stages, tracking, sweeps, reports."""
