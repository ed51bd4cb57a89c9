"""User-facing errors: one clear message that names the file and the problem.

Every check of user input raises :class:`InputError`; command-line entry points wrap their
``main`` with :func:`exit_on_input_error` so that a user sees one line and a non-zero exit
status instead of a stack trace from deep inside torch.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad input from the user (file, shape, value, checkpoint): the message says which and why."""


def exit_on_input_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a CLI ``main``: an :class:`InputError` prints ``error: <message>`` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``exc`` (MONAI transforms and config parsing wrap errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Show an uncaught :class:`InputError` (even wrapped) as one ``error:`` line, exit status 1.

    ``python -m monai.bundle run`` has no hook of its own for this; other exceptions keep
    Python's usual traceback. Installed once when the ``scripts`` package is imported.
    """
    previous = sys.excepthook
    if getattr(previous, "_eoir_hook", False):
        return

    def hook(exc_type, exc, tb):
        err = find_input_error(exc)
        if err is None:
            previous(exc_type, exc, tb)
        else:
            print(f"error: {err}", file=sys.stderr)

    hook._eoir_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
