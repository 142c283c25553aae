"""Baselines: every kernel POD-Attention is compared with, registered in baselines.registry."""
