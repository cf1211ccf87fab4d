"""A service that is not there, or not what it should be, is one line in seconds.

Real services throughout: ``python -m http.server`` for "answers HTTP but is not MLflow",
small ``http.server`` handlers for MLflow's /health and an auth proxy's 401, a bound socket
for a port in use, a closed port for a server that is down.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kd.sweep.spec import SweepError
from kd.sweep.util import probe_tracking

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen | None = None, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc is None or proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, f"nothing listens on {port} after {timeout_s} s"
            time.sleep(0.1)


@pytest.fixture
def plain_http() -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1: HTTP, but not MLflow (/health is a 404)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT / "tests")
    try:
        _wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _health_server(status: int, body: bytes) -> tuple[http.server.HTTPServer, str]:
    """An HTTP server on 127.0.0.1 whose every GET answers ``status`` with ``body``."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _sweep(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The timeouts here only guard against a hang (a refusal takes seconds; what these tests
    # replaced hung, or retried for 30 s and more, printing lines they assert are absent).
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke",
                           "--output-dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache"), **env})


# ------------------------------------------------------- probe_tracking (items 2 and 3)


@pytest.mark.parametrize("status, body", [(200, b"OK"), (401, b"login"), (403, b"")],
                         ids=["mlflow", "auth-proxy-401", "auth-proxy-403"])
def test_an_mlflow_server_or_an_auth_proxy_in_front_of_one_counts_as_there(status, body):
    server, url = _health_server(status, body)
    try:
        probe_tracking(url)
        probe_tracking(url + "/")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, said", [(200, b"<html>hello</html>", "HTTP 200 b'<html>"),
                                                (500, b"", "HTTP 500")])
def test_an_http_answer_that_is_not_mlflows_is_refused(status, body, said):
    server, url = _health_server(status, body)
    try:
        with pytest.raises(SweepError, match=f"answers but is not an MLflow server .*{said}"):
            probe_tracking(url)
    finally:
        server.shutdown()
        server.server_close()


def test_plain_http_server_is_refused_without_printing_credentials(plain_http):
    secret = plain_http.replace("http://", "http://alice:s3cret@")
    with pytest.raises(SweepError) as e:
        probe_tracking(secret)
    message = str(e.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={plain_http} answers but is not an MLflow server"), message
    assert "HTTP 404" in message and "s3cret" not in message and "alice" not in message


@pytest.mark.parametrize("uri", ["garbage://x", "GARBAGE://alice:pw@host/x", "s3://bucket/mlruns"])
def test_a_scheme_mlflow_has_no_store_for_is_refused_naming_what_is_allowed(uri):
    with pytest.raises(SweepError) as e:
        probe_tracking(uri)
    message = str(e.value)
    assert "is not allowed: MLflow has no tracking store for the scheme" in message, message
    assert "pw" not in message and "sqlite" in message and "http" in message and "file" in message
    assert "\n" not in message


@pytest.mark.parametrize("uri", ["", "sqlite:////tmp/x/mlflow.db", "/tmp/x/mlruns", "mlruns", "file:///tmp/x",
                                 "postgresql+psycopg2://u@h/db", "databricks"])
def test_stores_mlflow_opens_without_a_server_pass_without_a_probe(uri):
    probe_tracking(uri)


def test_sweep_on_a_non_mlflow_http_server_fails_in_one_line_before_ray(tmp_path, plain_http):
    proc = _sweep(tmp_path, {"MLFLOW_TRACKING_URI": plain_http})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"sweeps/temperature.py: error: MLFLOW_TRACKING_URI={plain_http} answers but is not an MLflow server "
        "(GET /health gave HTTP 404, MLflow's gives 'OK'): set it to the tracking server's URL, or unset "
        "MLFLOW_TRACKING_URI to log to a local mlflow.db"], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_sweep_with_an_unknown_scheme_fails_in_one_line_before_ray(tmp_path):
    proc = _sweep(tmp_path, {"MLFLOW_TRACKING_URI": "garbage://x"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLFLOW_TRACKING_URI=garbage://x is not allowed: MLflow has no tracking store " \
        "for the scheme 'garbage'; use a URI of scheme " in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ kd report (item 1)


def _kd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})


def test_kd_report_with_the_tracking_server_down_fails_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proc = _kd("report", "temperature", "--out", str(tmp_path / "r"), env={"MLFLOW_TRACKING_URI": url})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"kd report: MLFLOW_TRACKING_URI={url} does not answer ([Errno 111] Connection refused): start the "
        "tracking server, or pass --tracking-uri with a sweep's output dir or mlflow.db"], proc.stderr[-2000:]
    assert proc.stdout == ""
    assert not (tmp_path / "r").exists()


def test_kd_report_refuses_a_non_mlflow_server_and_an_unknown_scheme_by_flag_name(tmp_path, plain_http):
    proc = _kd("report", "temperature", "--tracking-uri", plain_http, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"kd report: --tracking-uri={plain_http} answers but is not an MLflow server"), line
    proc = _kd("report", "temperature", "--tracking-uri", "garbage://x", "--out", str(tmp_path / "r"))
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "--tracking-uri=garbage://x is not allowed: MLflow has no tracking store" in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- kd ui (items 4, 5)


def test_kd_ui_on_a_tracking_server_says_open_it_and_starts_nothing(tmp_path):
    port = _free_port()
    proc = _kd("ui", "--port", str(_free_port()),
                     env={"MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"kd ui: MLFLOW_TRACKING_URI=http://127.0.0.1:{port} is already an MLflow server, which serves its own "
        f"UI: open http://127.0.0.1:{port} in a browser (kd ui serves a local store: give --store with a "
        "sweep's output dir)"], proc.stderr
    assert proc.stdout == ""  # no URL of a server that never starts
    proc = _kd("ui", "--store", "https://mlflow.example.com/")
    assert proc.returncode == 2 and "--store=https://mlflow.example.com/ is already an MLflow server" in proc.stderr


def test_kd_ui_on_a_port_in_use_fails_in_one_line_before_starting_a_server(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _kd("ui", "--store", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(port))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"kd ui: --port={port} is not allowed: 127.0.0.1:{port} cannot be listened on ([Errno 98] Address already "
        "in use); pick a free port with --port, or stop what holds it"], proc.stderr[-2000:]
    assert proc.stdout == ""
    assert not (tmp_path / "mlflow.db").exists(), "no server started (it would have created the store)"


def test_kd_ui_whose_server_exits_on_its_own_exits_non_zero_even_when_the_server_says_0(tmp_path, monkeypatch,
                                                                                         capsys):
    """``mlflow server`` exits 0 when uvicorn cannot bind; any server that ends by itself has
    stopped serving. A real process that exits 0 stands in for it."""
    import analysis.commands as commands
    from kd.cli import main

    monkeypatch.setattr(commands, "ui_command", lambda *_a, **_k: [sys.executable, "-c", "pass"])
    rc = main(["ui", "--store", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(_free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["kd ui: the MLflow server exited on its own (status 0) before it was stopped; its "
                               "output above says why"], err


def test_serve_raises_when_the_server_ends_by_itself_and_returns_0_when_stopped():
    from kd.serve import ServerExited, serve

    for status in (0, 3):
        with pytest.raises(ServerExited) as e:
            serve([sys.executable, "-c", f"raise SystemExit({status})"])
        assert e.value.status == status


def test_kd_ui_and_kd_eval_help_show_their_defaults(capsys):
    from kd.cli import main

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    ui = help_of("ui")
    assert "must be free (default: 5000)" in ui and "server worker processes (default: 1)" in ui
    assert "exits with status 2" in ui  # what it does with an http(s) store
    ev = help_of("eval")
    assert "(default: all items)" in ev and "(default: none: zero-shot" in ev
    from analysis.commands import main as analysis_main

    with pytest.raises(SystemExit):
        analysis_main(["ui", "--help"])
    assert "(default: 5000)" in capsys.readouterr().out


# ------------------------------------------ the hub out of reach, no HF_*_OFFLINE (items 6, 7)


def _no_hub_env(tmp_path: Path) -> dict[str, str]:
    """No HF_*_OFFLINE, and a hub that cannot be reached: HF_ENDPOINT on a closed port of
    127.0.0.1 (so that nothing can reach the real hub either, whatever this machine's network),
    no proxy, and empty hub caches (a data set cached here would let lm-eval run)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY",
                        "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}", "HF_HOME": str(tmp_path / "hf"),
            "KD_CACHE_DIR": str(tmp_path / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _run_kd(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


def test_hub_probe_is_a_real_connect():
    from kd.hub import reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert reachable(("127.0.0.1", s.getsockname()[1]), timeout_s=2)
    assert not reachable(("127.0.0.1", _free_port()), timeout_s=2)
    assert not reachable(("no-such-host.invalid", 443), timeout_s=2)


def test_offline_unless_reachable_sets_the_variables_and_the_imported_clients_flags(tmp_path):
    code = ("import os, huggingface_hub.constants as c, datasets.config as d, kd.hub as h\n"
            "assert not c.HF_HUB_OFFLINE and not d.HF_HUB_OFFLINE\n"
            "assert h.offline_unless_reachable(timeout_s=2)\n"
            "print(os.environ['HF_HUB_OFFLINE'], os.environ['HF_DATASETS_OFFLINE'], c.HF_HUB_OFFLINE,"
            " d.HF_HUB_OFFLINE, d.HF_DATASETS_OFFLINE)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_no_hub_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "True", "True", "True"]


def test_kd_eval_harness_without_network_or_offline_variables_is_the_offline_line(tmp_path):
    pytest.importorskip("lm_eval")
    from factories import make_model, make_tokenizer, save_pretrained_pair

    tok = make_tokenizer()
    model = save_pretrained_pair(tmp_path / "model", tok, make_model(tok))
    proc = _run_kd(["eval", "--model", str(model), "--harness", "lambada_openai", "--limit", "5",
                          "--out", str(tmp_path / "eval.json")], _no_hub_env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [ln for ln in proc.stderr.splitlines() if ln.startswith("kd: error:")], proc.stderr[-3000:]
    assert len(errors) == 1 and "--harness task 'lambada_openai' cannot run offline" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("override, line", [
    ("data.source=nonexistent_folder", "kd: error: data.source='nonexistent_folder' is not allowed: it is not an "
                                       "existing local path and could not be loaded as a hub dataset"),
    ("teacher.source=nonexistent_teacher", "kd: error: teacher.source='nonexistent_teacher' is not allowed: it is "
                                           "not an existing local directory and could not be loaded as a hub id"),
])
def test_a_missing_local_source_without_network_fails_at_once(tmp_path, tiny_overrides, override, line):
    out = tmp_path / "out"
    args = ["distill", *(f"{k}={v}" for k, v in tiny_overrides.items()), override, f"output_dir={out}"]
    proc = _run_kd(args, _no_hub_env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-3000:]  # no "Retrying in 8s" lines
    assert not out.exists()


# ------------------------------------------------------------ kd eval --model PATH (item 8)


@pytest.fixture
def lambada_file(tmp_path: Path) -> Path:
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"text": "the quick brown fox"}\n')
    return path


@pytest.mark.parametrize("model, what", [("{tmp}/nomodel", "no such folder"), ("./nomodel", "no such folder"),
                                         ("../nomodel", "no such folder"), ("~/kd-no-such-model-dir", "no such folder"),
                                         ("{tmp}/lambada.jsonl", "it is a file, not a folder")])
def test_kd_eval_model_path_that_is_no_folder_says_so(tmp_path, lambada_file, capsys, monkeypatch, model, what):
    from kd.cli import main

    monkeypatch.chdir(tmp_path)
    model = model.format(tmp=tmp_path)
    rc = main(["eval", "--model", model, "--task", "lambada", "--data", str(lambada_file),
               "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"kd: error: --model={model!r} could not be loaded: {what}; give a save_pretrained "
                               "directory (with its tokenizer) or a hub id such as gpt2"], err


def test_kd_eval_model_hub_id_is_still_looked_up_on_the_hub(tmp_path, lambada_file, capsys):
    from kd.cli import main

    rc = main(["eval", "--model", "kd-tests/no-such-model", "--task", "lambada", "--data", str(lambada_file),
               "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("kd: error: --model='kd-tests/no-such-model' could not be "
                                                           "loaded: "), err
    assert "no such folder" not in err[0]


def test_a_relative_model_folder_without_dot_slash_still_loads(tmp_path, lambada_file, capsys, monkeypatch):
    from factories import make_model, make_tokenizer, save_pretrained_pair

    from kd.cli import main

    tok = make_tokenizer()
    save_pretrained_pair(tmp_path / "student", tok, make_model(tok))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "student", "--task", "lambada", "--data", str(lambada_file),
                 "--out", str(tmp_path / "eval.json"), "--device", "cpu"]) == 0
    assert (tmp_path / "eval.json").is_file()
