"""Moving a file to a name that must not be taken: never over another file, even one that appears meanwhile."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from adapterzoo.errors import AdapterzooError

NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EISDIR)


def move_new(src: Path, target: Path) -> bool:
    """Give `src` the name `target` unless that name exists (checked atomically where hard links work: link,
    then unlink; a folder, a symlink, or a file system without hard links is checked, then renamed). False if
    taken."""
    if not src.is_symlink():
        try:
            os.link(src, target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise AdapterzooError(f"cannot create {target}: {exc.strerror or exc}") from None
        else:
            os.unlink(src)
            return True
    if os.path.lexists(target):
        return False
    os.replace(src, target)
    return True
