"""Where standalone shards and routers meet when no socket path is given: a directory only
this user can enter, never a name in a shared /tmp that another user could take first."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeDirectory(Exception):
    """The private directory exists but is not private: said in one line, with the fix."""


def private_runtime_dir() -> Path:
    """`{tmp}/pytgi-{uid}`, created with mode 0700; refused if it is a link, belongs to
    another user, or lets others in (as tmux and ssh-agent check theirs)."""
    path = Path(tempfile.gettempdir()) / f"pytgi-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UnsafeDirectory(
            f"{path} is not a private directory of this user (a link, another owner, or "
            "open to others); remove it or pass an explicit socket path"
        )
    return path


def default_uds_path() -> str:
    """The socket prefix a standalone shard listens on and a standalone router dials."""
    return str(private_runtime_dir() / "server")
