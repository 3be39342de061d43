"""Whether any local user may change the code an ``msmt`` command runs.

A local user's review: under ``umask 000`` a first run wrote ``broker/__pycache__``
0777, and a ``.pyc`` another user put there ran as root at the next ``msmt`` command;
a checkout under that umask left the sources 0666. ``broker.entry`` asks this before
it imports the commands, so a planted module is refused before it runs (all but this
package's ``__init__`` and ``entry``, which run first: ``make install`` compiles the
package under ``umask 022`` so that their cache folder is never made open). Light on
purpose: the standard library's ``os``, ``stat``, ``sys`` and ``sysconfig`` only.
"""

from __future__ import annotations

import os
import stat
import sys
import sysconfig

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def code_open_to_others() -> str | None:
    """Why the code this process runs is open to other users, or None when it is not.

    Every folder and file of the ``broker`` package (its bytecode caches too), the
    site and scripts folders, and under ``PYTHONPYCACHEPREFIX`` the package's cache
    folders and the folders above them: none writable by every user (sticky or
    not: a user may make its own folder in a sticky one), and under the prefix none
    owned by a user other than this one or root.
    """
    paths = [_PACKAGE]
    for root, dirs, files in os.walk(_PACKAGE):
        paths += [os.path.join(root, name) for name in (*dirs, *files)]
    paths += [sysconfig.get_path(name) for name in ("purelib", "platlib", "scripts")]
    owned: list[str] = []
    if sys.pycache_prefix:
        # The prefix mirrors each source folder's absolute path below it.
        prefix = os.path.abspath(sys.pycache_prefix)
        mirror = os.path.join(prefix, _PACKAGE.lstrip(os.sep))
        folder = mirror
        while len(folder) > len(prefix):
            owned.append(folder)
            folder = os.path.dirname(folder)
        owned.append(prefix)
        for root, dirs, files in os.walk(mirror):
            owned += [os.path.join(root, name) for name in (*dirs, *files)]
    for path in (*paths, *owned):
        try:
            info = os.lstat(path)
        except OSError:
            continue  # not there: nothing in it runs
        if info.st_mode & stat.S_IWOTH and not stat.S_ISLNK(info.st_mode):
            return (
                f"{path} is writable by every local user (mode"
                f" {stat.S_IMODE(info.st_mode):04o}): anyone could change the code msmt runs;"
                " chmod o-w it (installed or run under umask 000?)"
            )
        if path in owned and info.st_uid not in (0, os.geteuid()):
            return (
                f"{path} belongs to another user (uid {info.st_uid}), who could put code"
                " there that msmt runs: use a bytecode cache folder of your own"
                " (PYTHONPYCACHEPREFIX)"
            )
    return None
