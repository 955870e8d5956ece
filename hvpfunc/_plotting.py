"""The matplotlib figure every ``plot()`` method draws on."""

from __future__ import annotations

from typing import Any, Tuple


def axes(ax: Any, owner: str, figsize: Tuple[float, float] = (6, 4)) -> Tuple[Any, Any]:
    """``(figure, axes)``: ``ax`` and its figure, or a new figure of ``figsize``.

    Raises:
        ImportError: matplotlib is not installed; the message names ``owner`` (the
            method asked for) and the extra to install.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"{owner} needs matplotlib: pip install 'hvpfunc[plot]'") from err
    if ax is None:
        return plt.subplots(figsize=figsize)
    return ax.figure, ax
