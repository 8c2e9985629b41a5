"""Where the library's warnings point: the user's line, however deep they are raised."""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside this package
    and PyTorch (the user's line that built a block, solved or called backward).

    Counted from the frame that calls :func:`warnings.warn`, so it holds wherever the warning
    is raised and however the call chain between the user and that frame changes.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torchode_adjoint") or name.split(".")[0] == "torch"):
            return level
        frame, level = frame.f_back, level + 1
    return 1
