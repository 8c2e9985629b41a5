"""Where the library's warnings point: the user's line, however deep they are raised."""

from __future__ import annotations

import sys
from types import FrameType

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside this package
    and PyTorch (the user's line that built a block, solved or called backward).

    Counted from the frame that calls :func:`warnings.warn`, so it holds wherever the warning
    is raised and however the call chain between the user and that frame changes.
    """
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        package = frame.f_globals.get("__name__", "").split(".")[0]
        if package not in ("torchode_adjoint", "torch"):
            return level
        frame, level = frame.f_back, level + 1
    return 1
