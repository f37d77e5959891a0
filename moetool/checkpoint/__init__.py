"""Checkpoints on disk: where a model comes from (directory, preset, cached Hub id), its
safetensors headers and completeness, fingerprints, and atomic output directories.
Nothing here imports torch."""
