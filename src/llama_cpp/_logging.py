"""Routes llama.cpp's log into Python :mod:`logging`, under the ``llama_cpp`` logger.

llama.cpp logs through one process-wide callback. The native side assembles whole lines and
drops those below its threshold without taking the GIL; the rest reach :func:`_forward`.
Configure the ``llama_cpp`` logger as usual to see them (``logging.basicConfig(level=INFO)``).
"""

from __future__ import annotations

import atexit
import logging

from llama_cpp import _core

logger = logging.getLogger("llama_cpp")

_TO_PYTHON = {
    _core.LOG_LEVEL_DEBUG: logging.DEBUG,
    _core.LOG_LEVEL_INFO: logging.INFO,
    _core.LOG_LEVEL_WARN: logging.WARNING,
    _core.LOG_LEVEL_ERROR: logging.ERROR,
}
_TO_NATIVE = [
    (logging.DEBUG, _core.LOG_LEVEL_DEBUG),
    (logging.INFO, _core.LOG_LEVEL_INFO),
    (logging.WARNING, _core.LOG_LEVEL_WARN),
]


def _forward(level: int, line: str) -> None:
    python_level = _TO_PYTHON.get(level, logging.INFO)
    if logger.isEnabledFor(python_level):
        logger.log(python_level, "%s", line)


def set_native_log_level(level: int) -> None:
    """Pass llama.cpp log lines at ``level`` (a :mod:`logging` level) and above to Python.

    Lines below it are dropped in C++ without taking the GIL. The default is ``INFO``.
    """
    native = _core.LOG_LEVEL_ERROR
    for python_level, native_level in _TO_NATIVE:
        if level <= python_level:
            native = native_level
            break
    _core.set_log_level(native)


def install() -> None:
    """Install the bridge; removed again at exit, before the interpreter is torn down."""
    _core.set_log_callback(_forward)
    set_native_log_level(logging.INFO)
    atexit.register(_core.set_log_callback, None)
