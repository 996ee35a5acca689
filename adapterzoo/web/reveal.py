"""The file page's "reveal": show a registry file in the desktop's file manager, when the machine has one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def reveal_path(path: str) -> bool:
    """Open the file manager at `path` (selected where the platform can); False where there is none to open."""
    target = Path(path)
    if sys.platform == "darwin":
        command = ["open", "-R", str(target)]
    elif sys.platform == "win32":
        command = ["explorer", f"/select,{target}"]
    else:
        opener = shutil.which("xdg-open")
        if opener is None:
            return False
        command = [opener, str(target if target.is_dir() else target.parent)]
    try:
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return False
    return True
