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

    Every folder and file of the ``broker`` package (its bytecode caches too), every
    folder on the import path (an editable install puts the clone's own there, where a
    ``sitecustomize.py`` would run first: a review), and the whole of a
    ``PYTHONPYCACHEPREFIX`` and the folders above it: none writable by every user
    (sticky or not: a user may make its own file in a sticky folder), and in the prefix
    none owned by a user other than this one or root. A check, not a sandbox: modules
    Python loads as it starts run before it, so the prefix must be a folder of one's own.
    """
    paths = [_PACKAGE]
    for root, dirs, files in os.walk(_PACKAGE):
        paths += [os.path.join(root, name) for name in (*dirs, *files)]
    paths += [sysconfig.get_path(name) for name in ("purelib", "platlib", "scripts")]
    # Resolved: a link on the path to an open folder is that folder (a review).
    on_path = {os.path.realpath(entry) for entry in sys.path if entry and os.path.isdir(entry)}
    paths += sorted(on_path)
    cache: list[str] = []
    above: list[str] = []
    if sys.pycache_prefix:
        prefix = os.path.realpath(sys.pycache_prefix)  # a link to an open folder: that
        cache.append(prefix)
        for root, dirs, files in os.walk(prefix):
            cache += [os.path.join(root, name) for name in (*dirs, *files)]
        folder = os.path.dirname(prefix)
        while True:
            above.append(folder)
            if os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    mine, sticky_ok = {*cache, *above}, set(above)
    for path in (*paths, *cache, *above):
        try:
            info = os.lstat(path)
        except OSError:
            continue  # not there: nothing in it runs
        if stat.S_ISLNK(info.st_mode):
            continue  # what it points at is looked at where it is walked
        # Above the prefix a sticky folder (/tmp) lets nobody swap ours; below, any
        # folder open to all lets anyone put a file there.
        open_to_all = info.st_mode & stat.S_IWOTH and not (
            path in sticky_ok and info.st_mode & stat.S_ISVTX
        )
        if open_to_all and path in on_path:
            return (
                f"{path} is on the import path (PYTHONPATH, or the working directory) and"
                f" writable by every local user (mode {stat.S_IMODE(info.st_mode):04o}):"
                " anyone could put code there that msmt runs; take it off the path"
            )
        if open_to_all:
            return (
                f"{path} is writable by every local user (mode"
                f" {stat.S_IMODE(info.st_mode):04o}): anyone could change the code msmt runs;"
                " chmod o-w it (installed or run under umask 000?)"
            )
        if path in mine and info.st_uid not in (0, os.geteuid()):
            return (
                f"{path} belongs to another user (uid {info.st_uid}), who could put code"
                " there that msmt runs: use a bytecode cache folder of your own"
                " (PYTHONPYCACHEPREFIX)"
            )
    return None
