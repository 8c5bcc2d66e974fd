"""Fixtures that run this pack inside a real ComfyUI server, and the frontend in headless Chromium.

ComfyUI is found through the COMFYUI_DIR environment variable, or because this repository sits in
`<ComfyUI>/custom_nodes/<pack>`; without either, every test here is skipped with the reason. The
server runs with `--cpu` on a free 127.0.0.1 port and `--base-directory` set to a fresh temp dir, whose
`custom_nodes/` holds only a link to this repository (or to $COMFY_TEST_PACK_DIR) plus any dirs listed
in COMFY_TEST_EXTRA_PACKS (separated by os.pathsep), so no other pack of the developer's ComfyUI is
loaded. The server log is a
file under that temp dir; a failing test that used the server gets its tail in the report.
See docs/TESTING-COMFYUI.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO_ROOT / "tests" / "browser"
START_TIMEOUT_S = 120.0
UNLOADED_LOG = "unloaded; its video features were dropped"     # nodes/runtime.py logs it on unload
REQUIRE_ENV = "ADAPTTOKEN_REQUIRE_COMFY"  # "1": a skipped test here fails (CI: nothing may skip silently)
SKIP_NO_COMFY = "set COMFYUI_DIR to a ComfyUI checkout to run the ComfyUI tests"
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
BINARY_TEXT = 3  # protocol.BinaryEventTypes.TEXT: progress text a node streams


def find_comfyui() -> Path | None:
    """ComfyUI's root: $COMFYUI_DIR, else the ComfyUI whose custom_nodes/ holds this repository."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env).expanduser().resolve()
    parent = REPO_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return None


def pack_dir() -> Path:
    """The pack under test: this repository, or $COMFY_TEST_PACK_DIR (another checkout of it)."""
    env = os.environ.get("COMFY_TEST_PACK_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT


def pack_name(pack: Path) -> str:
    """The folder name the pack gets in custom_nodes/: its name in ComfyUI (/extensions/<name>/...)."""
    if pack.parent.name == "custom_nodes":
        return pack.name
    pyproject = pack / "pyproject.toml"
    if pyproject.is_file():
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
        if name:
            return name
    return "adapttoken" if pack == REPO_ROOT else pack.name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


TEXT_TYPES = ("application/json", "application/javascript", "application/xml")


def decode_body(raw: bytes, content_type: str) -> Any:
    """A response body: JSON -> Python objects, text -> str, binary (image/*, video/*,
    octet-stream...) -> bytes; an unlabelled body is JSON, else UTF-8 text, else bytes."""
    if not raw:
        return None
    textual = content_type.startswith("text/") or content_type in TEXT_TYPES or content_type.endswith("+json")
    if content_type and not textual:
        return raw
    try:
        return json.loads(raw)
    except ValueError:          # JSONDecodeError, and UnicodeDecodeError from non-UTF-8 bytes
        pass
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode(errors="replace") if textual else raw


class PromptRejected(Exception):
    """POST /prompt refused the prompt, or accepted it with node_errors (only part would run)."""

    def __init__(self, status: int, body: dict[str, Any]):
        self.status = status
        self.body = body
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")


@dataclass
class RunResult:
    """How one prompt ended: websocket status, its /history entry and the messages sent during it."""

    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    history: dict[str, Any]
    messages: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def outputs(self) -> dict[str, Any]:
        """Per node id, the ui dict the node returned (what `executed` carried)."""
        return self.history.get("outputs", {})

    def of_type(self, kind: str) -> list[Any]:
        return [data for t, data in self.messages if t == kind]

    def texts(self, node_id: str | None = None) -> list[str]:
        """Progress text streamed with PromptServer.send_progress_text, optionally for one node."""
        return [d["text"] for d in self.of_type("progress_text") if node_id is None or d["node"] == str(node_id)]

    @property
    def error(self) -> dict[str, Any] | None:
        errs = self.of_type("execution_error")
        return errs[0] if errs else None


class _Listener(threading.Thread):
    """Reads the server websocket in a background thread (aiohttp comes with ComfyUI)."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="comfy-ws")
        self.url = url
        self.messages: list[tuple[str, Any]] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # reported to waiters, never raised in this thread
            self.failure = e
        finally:
            self.connected.set()
            with self.cond:
                self.cond.notify_all()
            self._loop.close()

    async def _main(self) -> None:
        import aiohttp

        self._stop_event = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, max_msg_size=0, heartbeat=None) as ws:
                self.connected.set()
                stop = asyncio.ensure_future(self._stop_event.wait())
                while True:
                    recv = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if stop in done:
                        recv.cancel()
                        return
                    msg = recv.result()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self._add(data.get("type", "?"), data.get("data"))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self._add(*self._decode_binary(msg.data))
                    else:  # closed or error
                        raise ConnectionError(f"websocket ended: {msg.type} {msg.data!r}")

    @staticmethod
    def _decode_binary(raw: bytes) -> tuple[str, Any]:
        (event,) = struct.unpack(">I", raw[:4])
        body = raw[4:]
        if event == BINARY_TEXT:
            (n,) = struct.unpack(">I", body[:4])
            return "progress_text", {"node": body[4:4 + n].decode(), "text": body[4 + n:].decode(errors="replace")}
        return f"binary_{event}", {"bytes": len(body)}

    def _add(self, kind: str, data: Any) -> None:
        with self.cond:
            self.messages.append((kind, data))
            self.cond.notify_all()

    def stop(self) -> None:
        if not self.is_alive():
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(timeout=5)


class ComfyClient:
    """A small client for one running ComfyUI server (HTTP + its websocket)."""

    def __init__(self, base_url: str, base_dir: Path, log_path: Path, pack: str):
        self.base_url = base_url
        self.base_dir = base_dir
        self.log_path = log_path
        self.pack = pack
        self.client_id = uuid.uuid4().hex
        self.input_dir = base_dir / "input"
        self.output_dir = base_dir / "output"
        self.models_dir = base_dir / "models"
        self._ws = _Listener(base_url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}")

    # HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """(status, body): JSON decoded, text as str, anything else (images, video) as bytes."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get_content_type()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
            ctype = e.headers.get_content_type() if e.headers is not None else ""
        return status, decode_body(raw, ctype)

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path} answered {status}: {body}")
        return body

    def object_info(self, node_type: str | None = None) -> dict[str, Any]:
        if node_type is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{node_type}").get(node_type, {})

    def post_prompt(self, prompt: dict[str, Any], *, allow_node_errors: bool = False) -> str:
        """Queue an API-format prompt for this client; returns its prompt_id."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(status, body if isinstance(body, dict) else {"body": body})
        if body.get("node_errors") and not allow_node_errors:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Cancel, as the UI's Cancel button does (only the running prompt when prompt_id is given)."""
        status, body = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        assert status == 200, f"/interrupt answered {status}: {body}"

    def free(self, unload_models: bool = True, free_memory: bool = True, wait_unload_s: float = 10.0) -> bool:
        """POST /free, then wait up to `wait_unload_s` for the pack to log that its model was unloaded
        (/free only sets a flag that the prompt worker acts on when it next wakes: a prompt posted at
        once can run before it). -> whether an unload was seen (none: no model of ours was loaded)."""
        before = self.log().count(UNLOADED_LOG)
        status, body = self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})
        assert status == 200, f"/free answered {status}: {body}"
        deadline = time.monotonic() + wait_unload_s
        while self.log().count(UNLOADED_LOG) == before:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def wait(self, prompt_id: str, timeout: float = 120) -> RunResult:
        """Block until prompt_id ends; returns how it ended and the messages sent while it ran."""
        deadline = time.monotonic() + timeout
        ws = self._ws
        with ws.cond:
            while True:
                end = next((i for i, (t, d) in enumerate(ws.messages)
                            if t in TERMINAL_EVENTS and isinstance(d, dict) and d.get("prompt_id") == prompt_id), None)
                if end is not None:
                    break
                if ws.failure is not None:
                    raise AssertionError(f"websocket failed: {ws.failure!r}; server log: {self.log_path}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prompt {prompt_id} did not end within {timeout} s; server log: {self.log_path}")
                ws.cond.wait(timeout=min(left, 1.0))
            start = next((i for i, (t, d) in enumerate(ws.messages)
                          if t == "execution_start" and isinstance(d, dict) and d.get("prompt_id") == prompt_id), end)
            messages = list(ws.messages[start:end + 1])
        status = messages[-1][0].removeprefix("execution_")
        # The history entry is stored just after the terminal message is sent.
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return RunResult(prompt_id, status, entry or {}, messages)

    def run(self, prompt: dict[str, Any], timeout: float = 120) -> RunResult:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(prompt), timeout)

    def import_failures(self) -> list[str]:
        """Custom node folders the server could not import (their errors are only in the log)."""
        return [line.split("(IMPORT FAILED):", 1)[1].strip()
                for line in self.log_path.read_text(errors="replace").splitlines() if "(IMPORT FAILED):" in line]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _link_pack(custom_nodes: Path, name: str, target: Path) -> None:
    link = custom_nodes / name
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): copy, ignoring heavy or generated dirs
        shutil.copytree(target, link, ignore=shutil.ignore_patterns(".git", "node_modules", "__pycache__", ".venv"))


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    root = find_comfyui()
    if root is None:
        pytest.skip(SKIP_NO_COMFY)
    if not (root / "main.py").is_file():
        pytest.skip(f"{SKIP_NO_COMFY} (no main.py in {root})")
    return root


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyClient]:
    """A ComfyUI server with this pack loaded; killed at the end of the session."""
    base = tmp_path_factory.mktemp("comfy")
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    for sub in ("input", "output", "user", "models", "temp"):
        (base / sub).mkdir()
    pack = pack_dir()
    name = pack_name(pack)
    _link_pack(custom_nodes, name, pack)
    for extra in filter(None, os.environ.get("COMFY_TEST_EXTRA_PACKS", "").split(os.pathsep)):
        extra_path = Path(extra).expanduser().resolve()
        _link_pack(custom_nodes, extra_path.name, extra_path)

    port = free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--input-directory", str(base / "input"),
           "--output-directory", str(base / "output"), "--user-directory", str(base / "user"),
           "--temp-directory", str(base / "temp"), "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch"]
    # another frontend than the installed package (e.g. a newer comfyui-frontend-package's static
    # folder), and frontend settings (e.g. {"Comfy.VueNodes.Enabled": true}): docs/TESTING-COMFYUI.md
    if os.environ.get("COMFY_TEST_FRONTEND_ROOT"):
        cmd += ["--front-end-root", os.environ["COMFY_TEST_FRONTEND_ROOT"]]
    if os.environ.get("COMFY_TEST_SETTINGS"):
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(json.loads(os.environ["COMFY_TEST_SETTINGS"])))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print(f"\n[comfy] starting ComfyUI from {comfyui_dir} on port {port}; log: {log_path}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfyui_dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = ComfyClient(f"http://127.0.0.1:{port}", base, log_path, name)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} before answering; log {log_path}:\n"
                            f"{log_tail(log_path)}", pytrace=False)
            try:
                status, _ = client.request("GET", "/object_info", timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT_S:.0f} s; log {log_path}:\n"
                            f"{log_tail(log_path)}", pytrace=False)
            time.sleep(0.25)
        print(f"[comfy] ready after {time.monotonic() - t0:.1f} s")
        failed = client.import_failures()
        if failed:
            pytest.fail(f"ComfyUI could not import {failed}; log {log_path}:\n{log_tail(log_path, 120)}", pytrace=False)
        client._ws.start()
        if not client._ws.connected.wait(15) or client._ws.failure is not None:
            pytest.fail(f"websocket did not connect: {client._ws.failure!r}; log {log_path}", pytrace=False)
        yield client
    finally:
        try:
            client._ws.stop()
        finally:
            _stop_server(proc)


def _stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


@dataclass
class BrowserRun:
    """What tests/browser/comfy_ui.mjs did: exit code, its output, and per workflow its results."""

    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    results: list[dict[str, Any]]

    def api_prompt(self, stem: str) -> dict[str, Any]:
        return json.loads((self.out_dir / f"{stem}.api.json").read_text())

    def console(self) -> str:
        path = self.out_dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def comfy_browser(comfy_server: ComfyClient, tmp_path_factory: pytest.TempPathFactory):
    """A function running comfy_ui.mjs against the server: (workflows, require_nodes=(), queue=False) -> BrowserRun."""
    node = shutil.which("node")
    chromium = find_chromium()
    if node is None:
        pytest.skip("node is not installed (needed for the browser tests; see docs/TESTING-COMFYUI.md)")
    if chromium is None:
        pytest.skip("chromium is not installed (set CHROMIUM or install it; see docs/TESTING-COMFYUI.md)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is missing: run `npm ci` in tests/browser (see docs/TESTING-COMFYUI.md)")

    def run(workflows: list[Path | str], *, require_nodes: tuple[str, ...] = (), queue: bool = False,
            out_dir: Path | None = None, timeout: float = 600,
            probe_timeline: bool = False) -> BrowserRun:
        out = out_dir or tmp_path_factory.mktemp("browser")
        cmd = [node, str(BROWSER_DIR / "comfy_ui.mjs"), "--chromium", chromium]
        if require_nodes:
            cmd += ["--require-nodes", ",".join(require_nodes)]
        if queue:
            cmd.append("--queue")
        if probe_timeline:
            cmd.append("--probe-timeline")
        cmd += [comfy_server.base_url, str(out), *map(str, workflows)]
        proc = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        results_path = out / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else []
        return BrowserRun(proc.returncode, proc.stdout, proc.stderr, out, results)

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skip fails under ADAPTTOKEN_REQUIRE_COMFY=1; a failed test that used the server gets the log's tail."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(REQUIRE_ENV) == "1":
        # CI sets this: a ComfyUI or browser test that cannot run is a failure there, never a skip
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ENV}=1 but this ComfyUI/browser test was skipped: {reason}"
    client = getattr(item, "funcargs", {}).get("comfy_server")
    if report.failed and isinstance(client, ComfyClient):
        report.sections.append(("ComfyUI server log", f"{client.log_path}\n{log_tail(client.log_path)}"))
