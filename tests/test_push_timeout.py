"""`headwise push` against Hub endpoints that misbehave: it ends in bounded time with one message.

The endpoints are real local servers on 127.0.0.1 (HF_ENDPOINT points the push at them): one accepts
connections and never answers, one answers HTTP 500 to everything, and a closed port refuses. The push
runs as the real CLI in a subprocess with a fake token, which must appear in no output.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import headwise
from headwise.cli import main
from headwise.inference.config import BaseModelRef, InferenceConfig
from tests.conftest import run_cli

FAKE_TOKEN = "hf_fakeTokenForTests0123456789abcdef"
REPO_ID = "someone/tiny-export"
# No server thread outlives its test by more than this, whatever the push does.
SERVER_LIFETIME_S = 90


@pytest.fixture()
def export_dir(tiny_model_dir, tmp_path) -> Path:
    """A complete merged export of the tiny model: what `headwise push` accepts and uploads."""
    out = tmp_path / "export"
    shutil.copytree(tiny_model_dir, out)
    InferenceConfig(headwise_version=headwise.__version__, method="full", weights="merged",
                    base_model=BaseModelRef(name=str(tiny_model_dir))).save(out)
    (out / "README.md").write_text("# tiny export\n")
    return out


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hub_env(port: int, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The Hub at 127.0.0.1:port with a fake token; HF_HOME in tmp_path so no real login is read."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@contextmanager
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """Accept connections on 127.0.0.1 and never answer; yields the port and the accepted connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_until_stopped() -> None:
        deadline = time.monotonic() + SERVER_LIFETIME_S
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                accepted.append(listener.accept()[0])
            except (socket.timeout, OSError):
                continue

    thread = threading.Thread(target=accept_until_stopped, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


@contextmanager
def failing_server() -> Iterator[tuple[int, list[str]]]:
    """Answer every request on 127.0.0.1 with HTTP 500; yields the port and the requests seen (`METHOD path`)."""
    seen: list[str] = []

    class AlwaysFail(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(f"{self.command} {self.path}")
            body = b'{"error": "internal error"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _fail

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AlwaysFail)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    watchdog.start()
    try:
        yield server.server_address[1], seen
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.slow
def test_push_to_a_silent_endpoint_times_out_and_names_the_call(export_dir, tmp_path):
    before = checksums(export_dir)
    with silent_server() as (port, accepted):
        started = time.monotonic()
        res = run_cli("push", str(export_dir), "--repo-id", REPO_ID, "--timeout", "1", "--retries", "1",
                      env=hub_env(port, tmp_path), timeout=120)
        elapsed = time.monotonic() - started
        connections = len(accepted)
    assert res.returncode == 2, res.stderr
    assert elapsed < 60
    err = res.stderr
    assert "create_repo" in err and f"http://127.0.0.1:{port}" in err, err
    assert "within the 1 s timeout" in err and "2 tries" in err and "--timeout" in err, err
    assert connections >= 2  # the call was tried again
    assert "Traceback" not in err
    assert FAKE_TOKEN not in res.stdout + err
    assert checksums(export_dir) == before


@pytest.mark.slow
def test_push_to_an_endpoint_answering_500_retries_then_says_so(export_dir, tmp_path):
    """Timeout and retries from the environment (no flags): three tries of create_repo, then one message."""
    before = checksums(export_dir)
    with failing_server() as (port, seen):
        res = run_cli("push", str(export_dir), "--repo-id", REPO_ID, timeout=120,
                      env=hub_env(port, tmp_path, HEADWISE_HUB_TIMEOUT="5", HEADWISE_HUB_RETRIES="2"))
    assert res.returncode == 2, res.stderr
    assert seen.count("POST /api/repos/create") == 3, seen
    err = res.stderr
    assert "create_repo" in err and "answered HTTP 500" in err and "3 tries" in err, err
    assert f"http://127.0.0.1:{port}" in err and "try again later" in err, err
    assert "Traceback" not in err
    assert FAKE_TOKEN not in res.stdout + err
    assert checksums(export_dir) == before


@pytest.mark.slow
def test_push_to_a_closed_port_says_it_could_not_reach_the_endpoint(export_dir, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again when the push runs: the connection is refused
    res = run_cli("push", str(export_dir), "--repo-id", REPO_ID, "--retries", "0", env=hub_env(port, tmp_path),
                  timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"could not reach http://127.0.0.1:{port}" in res.stderr and "1 try" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and FAKE_TOKEN not in res.stdout + res.stderr


@pytest.mark.parametrize("args, words", [
    (["--timeout", "0"], "argument --timeout: '0': give seconds, more than 0 and at most 3600"),
    (["--timeout", "soon"], "argument --timeout: 'soon': give seconds"),
    (["--timeout", "nan"], "argument --timeout: 'nan': give seconds"),
    (["--retries", "-1"], "argument --retries: '-1': give a whole number from 0 to 10"),
    (["--retries", "11"], "argument --retries: '11': give a whole number from 0 to 10"),
])
def test_bad_timeout_and_retries_are_refused_at_parsing(export_dir, args, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["push", str(export_dir), "--repo-id", REPO_ID, *args])
    assert e.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("name, value, words", [
    ("HEADWISE_HUB_TIMEOUT", "-5", "HEADWISE_HUB_TIMEOUT -5.0: give seconds"),
    ("HEADWISE_HUB_TIMEOUT", "a minute", "HEADWISE_HUB_TIMEOUT 'a minute': give seconds"),
    ("HEADWISE_HUB_RETRIES", "many", "HEADWISE_HUB_RETRIES 'many': give a whole number from 0 to 10"),
])
def test_bad_timeout_and_retries_in_the_environment_are_named(export_dir, monkeypatch, capsys, name, value, words):
    """Refused before any Hub call, naming the variable and the accepted range."""
    monkeypatch.setenv(name, value)
    assert main(["push", str(export_dir), "--repo-id", REPO_ID]) == 2
    assert words in capsys.readouterr().err
