"""The jars of the JVM servers (Apache Kafka, Kafka Connect, Debezium), fetched once by Maven, and their `java`.

`jvm/pom.xml` beside this module names them; `resolve_jars()` has Maven copy them and everything they depend on
into one cache directory, `$XDG_CACHE_HOME/webhookd/jars/<hash of the pom>` (`~/.cache/...` by default), which is
then the classpath of every JVM started here. Maven keeps its own cache (`~/.m2`), so a new pom downloads only what
changed. These servers are for `make test-kafka` only: `make test` and production never need Java.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from webhookd.runtime.children import end_with_parent

POM = Path(__file__).with_name("jvm") / "pom.xml"
MIN_JAVA = 17  # Kafka 4's broker and Connect need it
_INSTALL_HINT = "on Debian or Ubuntu: apt-get install openjdk-17-jre-headless maven"
_MAVEN_TIMEOUT = 1200.0  # a cold ~/.m2 on a slow link; the whole set is about 60 MB
_OUTPUT_TAIL_CHARS = 4000


class JavaMissing(RuntimeError):
    """`java` (17 or newer) or `mvn` is not installed; the message says which and how to install it."""


def java_executable() -> str:
    """The `java` to run: $JAVA_HOME's if set (as Maven does), else the one on PATH; checked to be 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not candidate or not os.access(candidate, os.X_OK):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no `java` on PATH"
        raise JavaMissing(f"Java {MIN_JAVA} or newer is needed to run Apache Kafka here ({where}); {_INSTALL_HINT}")
    version = _java_major_version(candidate)
    if version < MIN_JAVA:
        raise JavaMissing(f"{candidate} is Java {version}; Apache Kafka 4 needs {MIN_JAVA} or newer; {_INSTALL_HINT}")
    return candidate


def _java_major_version(java: str) -> int:
    result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    # `java -version` writes to stderr: 'openjdk version "17.0.15" 2025-04-15', or "1.8.0_392" before Java 9.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if result.returncode != 0 or match is None:
        raise JavaMissing(f"`{java} -version` failed or printed no version:\n{result.stderr.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def maven_executable() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise JavaMissing(f"Maven (`mvn`) is needed to fetch the Apache Kafka and Debezium jars; {_INSTALL_HINT}")
    return mvn


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "webhookd" / "jars"


def resolve_jars(pom: Path = POM) -> Path:
    """The directory holding every jar of pom's dependencies, fetched by Maven the first time; blocks.

    The directory appears whole or not at all: Maven copies into a temporary directory beside it, which is renamed
    into place once complete, so a run killed halfway leaves nothing that a later run would take for finished.
    Raises `JavaMissing` when `java` or (for a first resolution) `mvn` is not there.
    """
    java_executable()  # the jars are useless without it, so say so before downloading them
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    root = cache_root()
    target = root / digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{digest}.lock"):
        if target.is_dir():  # another process resolved it while we waited for the lock
            return target
        mvn = maven_executable()
        # What a killed run left half-copied; nobody else writes there while we hold the lock.
        for leftover in root.glob(f".{digest}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            _copy_dependencies(mvn, pom, staging)
            if not any(staging.glob("*.jar")):
                raise RuntimeError(f"Maven copied no jar from {pom} into {staging}")
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the jars from other users sharing the cache
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _copy_dependencies(mvn: str, pom: Path, out: Path) -> None:
    argv = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"]
    argv += ["-DincludeScope=runtime", f"-DoutputDirectory={out}"]
    try:
        result = subprocess.run(
            argv,
            cwd=out,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_MAVEN_TIMEOUT,
            check=False,
            # A Maven left running after we were killed would write into a dir that the next run deletes.
            # (The forking thread is this one, which waits for Maven, so the signal cannot come early.)
            preexec_fn=end_with_parent(signal.SIGKILL),
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"Maven did not finish fetching the jars within {_MAVEN_TIMEOUT:.0f} s") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-_OUTPUT_TAIL_CHARS:]
        raise RuntimeError(f"`{' '.join(argv)}` failed with status {result.returncode}:\n{output}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Two test runs starting at once must not have two Mavens writing the same ~/.m2 files.
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def jvm_argv(
    jars: Path,
    main_class: str,
    args: Sequence[str],
    *,
    log_config: Path,
    heap: str = "512m",
    extra_options: Sequence[str] = (),
) -> list[str]:
    """The command line that runs main_class on the jars in `jars`, logging as `log_config` says."""
    options = [
        f"-Xmx{heap}",
        "-Xss1m",
        # Small, short-lived servers on two cores: the serial collector's pauses do not matter here and it costs
        # neither the threads nor the memory of G1.
        "-XX:+UseSerialGC",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log_config}",
        *extra_options,
    ]
    return [java_executable(), *options, "-cp", str(jars / "*"), main_class, *args]


def write_log_config(path: Path, quiet: Sequence[str] = ()) -> Path:
    """A log4j2 configuration that writes INFO and above to stdout (our log file), loggers in `quiet` at WARN."""
    lines = [
        "status = warn",
        "appender.out.type = Console",
        "appender.out.name = STDOUT",
        "appender.out.layout.type = PatternLayout",
        "appender.out.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.out.ref = STDOUT",
    ]
    for i, name in enumerate(quiet):
        lines += [f"logger.q{i}.name = {name}", f"logger.q{i}.level = WARN"]
    path.write_text("\n".join(lines) + "\n")
    return path
