"""`--plot`: NLL against position (log axis), one line per run. matplotlib is optional."""

from __future__ import annotations

from .errors import MiniLLMError, WriteError


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MiniLLMError("--plot needs matplotlib: pip install 'minillm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_formats() -> list[str]:
    """The file extensions --plot can write (checked before a long run, not after)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return sorted(FigureCanvasAgg.get_supported_filetypes())


def plot_curves(path: str, curves: dict, title: str = "",
                training_length: int | None = None) -> None:
    """curves: label -> (positions, mean NLL). The format follows the extension (PNG, SVG...)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker=".", linewidth=1.2, label=label)
    if training_length:
        ax.axvline(training_length, color="grey", linestyle="--", linewidth=0.8,
                   label=f"training length {training_length}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel("mean NLL (nats), log-spaced windows")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise WriteError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
