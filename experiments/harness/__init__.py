"""The harness: the one check-and-time path behind every measurement of this repository.

  sweep.py       the experiment: run_sweep(cfg) expands, shards, refuses, resumes, runs, appends, logs
  points.py      a sweep config's points (validated BatchSpecs), shards, point ids
  running.py     one point on each backend: checked against the fp32 reference, timed, one tidy row
  timing.py      do_bench on a GPU, eager or through a CUDA graph; one wall-clock call on a CPU
  paths.py       the device of a run and the results file its rows go to
  results.py     the append-only row store with resume
  wandb_log.py   W&B logging
  summary.py     rows over the error threshold, status counts
  schema.py      the result-row schemas (attention, kernel and serving rows share the provenance columns)
  provenance.py  GPU, driver, library versions, git commit of every row
  paper_grid.py  the paper's attention grid as a point generator

Sweeps (`python -m experiments.attention`), kernel-config comparisons, GPU smoke checks and
`make reproduce` all run through it. This package imports nothing heavy on import.
"""
