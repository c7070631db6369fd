"""Files we write get the mode any new file of the user gets (0666 less their umask).

``save_pretrained`` writes safetensors through a temporary file, which comes out 0600: a server
running under another account, or a teammate sharing the cache or a run directory, could not read
the weights next to files they can read.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask_file_mode(directory: Path) -> int:
    """The mode a plain new file gets in ``directory`` (probed: reading the umask would change it process-wide)."""
    probe = Path(directory) / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def match_umask(directory: Path) -> None:
    """Give every file under ``directory`` the umask's file mode."""
    mode = umask_file_mode(directory)
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
