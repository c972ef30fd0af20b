"""``fastconv train --plot``: what d2l's Animator draws while ``train_ch6`` runs -- train loss
and train accuracy at fractions of each epoch, test accuracy at each epoch end -- written to a
PNG that is redrawn at every epoch end, with the plotted series next to it as JSON.

matplotlib is imported only here, with its Agg canvas (no display, no global backend change).
"""
from __future__ import annotations

import json
import os
from typing import Optional

SERIES = ("train loss", "train acc", "test acc")


def require_matplotlib() -> None:
    """A one-line SystemExit (a usage error on the command line) when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib, which is not installed: pip install "
                         "matplotlib (or pip install 'fastconv[bench]')") from None


class TrainPlot:
    """Points as d2l's Animator takes them; :meth:`save` redraws ``path`` and writes
    ``path`` with ``.json`` instead of ``.png`` (the series as plotted)."""

    def __init__(self, path: str, title: str, epochs: int):
        require_matplotlib()
        self.path, self.title, self.epochs = path, title, epochs
        self.points: dict[str, list] = {name: [] for name in SERIES}

    def add(self, x: float, **values: Optional[float]) -> None:
        for key, value in values.items():
            if value is not None:
                self.points[key.replace("_", " ")].append((float(x), float(value)))

    def save(self, title: Optional[str] = None) -> int:
        """Draw every series that has points; returns the number of lines drawn."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if title is not None:
            self.title = title
        fig = Figure(figsize=(5.0, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        styles = {"train loss": "-", "train acc": "m--", "test acc": "g-."}  # d2l's
        lines = 0
        for name in SERIES:
            pts = self.points[name]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles[name], label=name,
                        marker="o" if name == "test acc" and len(pts) == 1 else None)
                lines += 1
        ax.set_xlabel("epoch")
        ax.set_xlim(0, max(self.epochs, 1))
        ax.grid(True)
        if lines:
            ax.legend()
        ax.set_title(self.title, fontsize=9)
        fig.tight_layout()
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}.png"
        fig.savefig(tmp, format="png")
        os.replace(tmp, self.path)  # a viewer never sees a half-written file
        with open(os.path.splitext(self.path)[0] + ".json", "w") as f:
            json.dump(dict(title=self.title, lines=lines,
                           series={k: v for k, v in self.points.items() if v}), f, indent=1)
        return lines
