"""Evaluation of trained models: per-layer features and their files, linear probes, sampling,
classifier accuracy and confusion matrices."""
