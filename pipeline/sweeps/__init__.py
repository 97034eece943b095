"""Sweeps (Hydra multirun): a job's place in MLflow, the hooks around a sweep, and its report."""
