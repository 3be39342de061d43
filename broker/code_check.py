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


def _ancestors(path: str) -> list[str]:
    # Every folder above ``path``, up to the root.
    found = []
    folder = os.path.dirname(path)
    while True:
        found.append(folder)
        if os.path.dirname(folder) == folder:
            return found
        folder = os.path.dirname(folder)


def _site_folders() -> list[str]:
    # Where installed distributions live: the interpreter's, and any on the path (a
    # user site, the system's for a venv made with --system-site-packages).
    named = {sysconfig.get_path(name) for name in ("purelib", "platlib")}
    named |= {entry for entry in sys.path if os.path.basename(entry) in _SITE_NAMES}
    return sorted({os.path.realpath(folder) for folder in named if os.path.isdir(folder)})


_SITE_NAMES = frozenset({"site-packages", "dist-packages"})


def code_open_to_others() -> str | None:
    """Why the code this process runs is open to other users, or None when it is not.

    Every folder and file of the ``broker`` package (its bytecode caches too), the site
    folders and what is at their top (each dependency's package folder or module, and
    the ``.pth`` files: a review reinstalled click under ``umask 000`` and planted code
    in it), every folder on the import path (an editable install puts the clone's own
    there, where a ``sitecustomize.py`` would run first: a review), and the whole of a
    ``PYTHONPYCACHEPREFIX``: none writable by every user (sticky or not: a user may make
    its own file in a sticky folder), and in the prefix none owned by a user other than
    this one or root. Above all of these, no folder writable by every user unless it is
    sticky (``/tmp``): anyone could rename what is below it and put their own in its
    place. Below a dependency's top folder nothing is looked at (walking them all took
    30-50 ms a command): installed under an open umask, its top folder is open too. A
    check, not a sandbox: modules Python loads as it starts run before it, so the prefix
    must be a folder of one's own.
    """
    paths = [_PACKAGE]
    for root, dirs, files in os.walk(_PACKAGE):
        paths += [os.path.join(root, name) for name in (*dirs, *files)]
    sites = _site_folders()
    for site in sites:
        paths.append(site)
        with os.scandir(site) as entries:
            paths += [entry.path for entry in entries]
    scripts = sysconfig.get_path("scripts")
    paths.append(scripts)
    # Resolved: a link on the path to an open folder is that folder (a review).
    on_path = {os.path.realpath(entry) for entry in sys.path if entry and os.path.isdir(entry)}
    paths += sorted(on_path)
    cache: list[str] = []
    tops = [_PACKAGE, *sites, os.path.realpath(scripts), *on_path]
    if sys.pycache_prefix:
        prefix = os.path.realpath(sys.pycache_prefix)  # a link to an open folder: that
        cache.append(prefix)
        for root, dirs, files in os.walk(prefix):
            cache += [os.path.join(root, name) for name in (*dirs, *files)]
        tops.append(prefix)
    within = {*paths, *cache}
    # Only above: a folder that holds code itself (the clone's, on the path, above the
    # package) is no safer sticky, since anyone may add a module to it.
    above = sorted({folder for top in tops for folder in _ancestors(top)} - within)
    mine = {*cache, *_ancestors(cache[0])} if cache else set()
    for path in (*paths, *cache, *above):
        try:
            info = os.lstat(path)
        except OSError:
            continue  # not there: nothing in it runs
        if stat.S_ISLNK(info.st_mode):
            continue  # what it points at is looked at where it is walked
        mode = stat.S_IMODE(info.st_mode)
        if mode & stat.S_IWOTH and not (path not in within and mode & stat.S_ISVTX):
            return _open_to_all(path, mode, on_path - set(sites), within)
        if path in mine and info.st_uid not in (0, os.geteuid()):
            return (
                f"{path} belongs to another user (uid {info.st_uid}), who could put code"
                " there that msmt runs: use a bytecode cache folder of your own"
                " (PYTHONPYCACHEPREFIX)"
            )
    return None


def _open_to_all(path: str, mode: int, on_path: set[str], within: set[str]) -> str:
    # Why a folder or file every user may write to is refused, by where it is.
    if path in on_path:
        return (
            f"{path} is on the import path (PYTHONPATH, or the working directory) and"
            f" writable by every local user (mode {mode:04o}): anyone could put code there"
            " that msmt runs; take it off the path"
        )
    if path not in within:
        return (
            f"{path} is writable by every local user and not sticky (mode {mode:04o}):"
            " anyone could put their own code in place of what msmt runs below it; chmod"
            " o-w it (or +t)"
        )
    return (
        f"{path} is writable by every local user (mode {mode:04o}): anyone could change"
        " the code msmt runs; chmod o-w it (installed or run under umask 000?)"
    )
