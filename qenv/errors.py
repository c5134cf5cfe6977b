"""User-facing errors.

Every mistake a user can make (a wrong path, an impossible budget, a malformed config) is raised
as a :class:`QenvError` carrying what is wrong and how to fix it. The command-line programs print
these as one line and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations


class QenvError(Exception):
    """An error caused by the user's input, with a suggested fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")
