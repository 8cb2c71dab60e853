"""Every figure of the project, drawn with matplotlib: attention maps, head scores, training curves.

One small module so that the training loop and the models stay free of plotting code. Figures are
drawn off-screen (the Agg backend: no display needed) and written under a temporary name, then
renamed, so an interrupted run never leaves half a PNG.

    python gpt.py --attention "The cat sat on the mat"   # heads.png, scores.png, ...
    python transformer.py --task reverse --attention     # the same views for a toy model
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write fig as a PNG under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
