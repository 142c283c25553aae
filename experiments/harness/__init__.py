"""The harness: the one check-and-time path behind every measurement of this repository.

  sweep.py       points of a sweep config -> batches -> every backend: checked against the fp32
                 reference, timed (do_bench), one tidy row per (point, backend); run_sweep is the
                 whole experiment (resume, shards, progress, W&B, summary)
  schema.py      the result-row schemas (attention, kernel and serving rows share the provenance columns)
  results.py     the append-only row store with resume, and W&B logging
  provenance.py  GPU, driver, library versions, git commit of every row

Sweeps (`python -m experiments.attention`), kernel-config comparisons, GPU smoke checks and
`make reproduce` all run through it. This package imports nothing heavy on import.
"""
