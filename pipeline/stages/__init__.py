"""The stages of the DVC pipeline, one entry module each: python -m pipeline.stages.<stage>."""
