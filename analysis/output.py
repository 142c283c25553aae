"""Writing figures and tables, shared by every figure module (figures, paper_figures, serving_figures).

Figures rebuilt from the same rows are the same bytes (`make figures` on committed rows leaves the tree
clean): no creation date and no library versions in the files' metadata, and nothing random is
drawn (no jitter).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PNG_METADATA = {"Software": None}
PDF_METADATA = {"Creator": "analysis.figures", "Producer": None, "CreationDate": None}

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def gpu_title(what: str, gpus) -> str:
    gpus = [g for g in gpus if g]
    return f"{what} — {', '.join(gpus) if gpus else 'GPU unknown'}"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_").lower() or "unknown"


def save(fig, out: Path, name: str) -> list[Path]:
    """`fig` as <out>/<name>.png and .pdf, then closed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata=PNG_METADATA)
    fig.savefig(paths[1], bbox_inches="tight", metadata=PDF_METADATA)
    plt.close(fig)
    return paths


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency); floats to 4 significant digits."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else f"{v:.4g}"
        if v is None or v is pd.NA:
            return ""
        return str(v).replace("|", "\\|")
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """`df` as <out>/<name>.csv and .md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.csv", out / f"{name}.md"]
    df.to_csv(paths[0], index=False, float_format="%.12g")   # 12 digits: no last-ulp churn between runs
    paths[1].write_text(to_markdown(df))
    return paths
