"""Tests of the study (run with the rest: python -m pytest)."""
