"""Hydra entry points: parse a config, call library code, write result rows."""
