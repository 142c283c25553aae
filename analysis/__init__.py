"""Analysis: pure functions from result tables to summary tables and figures.

    load.load_results(path)        -> Results(attention, serving, ceilings) DataFrames
    speedup.attention_speedups(df) -> one row per (point, backend) with speed-ups and exclusion flags
    speedup.summarize(sp)          -> geomean / max / min / share faster per backend (and per model)
    figures.build_all(results, out)-> every figure (PNG + PDF) and summary table (Markdown + CSV): the
                                      one entry point, over the one list figures.FIGURE_BUILDERS

Analysis reads tables; it never runs kernels.
"""
