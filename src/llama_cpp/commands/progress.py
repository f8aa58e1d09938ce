"""Progress shown on a terminal while a model loads: a ``rich`` bar, else a ``tqdm`` bar (if
either is installed: ``pip install llama-cpp-nanobind[cli]``), else a plain percentage.

Nothing is drawn when the stream is not a terminal, so piped output and logs stay clean.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TextIO

#: Called with the fraction done, in [0, 1] (``LlamaConfig.progress_callback``).
ProgressCallback = Callable[[float], None]


@contextmanager
def load_progress(path: str, stream: TextIO | None = None) -> Iterator[ProgressCallback | None]:
    """A ``progress_callback`` that draws the loading of ``path`` on ``stream`` (default:
    stderr), or None when ``stream`` is not a terminal. The bar goes when the block ends."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        yield None
        return
    label = f"loading {os.path.basename(path)}"
    with _bar(label, out) as update:
        yield update


def _bar(label: str, out: TextIO) -> AbstractContextManager[ProgressCallback]:
    try:
        return _rich_bar(label, out)
    except ImportError:
        pass
    try:
        return _tqdm_bar(label, out)
    except ImportError:
        return plain_bar(label, out)


@contextmanager
def _rich_bar(label: str, out: TextIO) -> Iterator[ProgressCallback]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=out), transient=True) as progress:
        task = progress.add_task(label, total=1.0)
        yield lambda fraction: progress.update(task, completed=fraction)


@contextmanager
def _tqdm_bar(label: str, out: TextIO) -> Iterator[ProgressCallback]:
    from tqdm import tqdm

    format_ = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}"
    with tqdm(total=1.0, desc=label, file=out, leave=False, bar_format=format_) as bar:

        def update(fraction: float) -> None:
            bar.n = fraction
            bar.refresh()

        yield update


@contextmanager
def plain_bar(label: str, out: TextIO) -> Iterator[ProgressCallback]:
    """``label: NN%`` rewritten in place (a percentage is written only when it changes), and
    the line erased at the end."""
    shown = -1

    def update(fraction: float) -> None:
        nonlocal shown
        percent = int(fraction * 100)
        if percent != shown:
            shown = percent
            out.write(f"\r{label}: {percent:3d}%")
            out.flush()

    try:
        yield update
    finally:
        if shown >= 0:
            out.write("\r\x1b[K")
            out.flush()
