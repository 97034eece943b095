"""Commands that are not DVC stages (``python -m pipeline.commands.<name>``)."""
