"""``cm3leon serve`` over HTTP (LitServe's app in a test client, its worker a real process): the answers to the three
kinds of request equal direct decoding, concurrent requests are served from one batch with a bad one answered alone,
malformed bodies get 422 naming the field, and the command reports bad arguments in one line."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start
from support.images import png_base64
from support.processes import free_port, group_alive

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.export import export_model
from cm3leon_lightning.generation import edit_image, generate_image, generate_text
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.tasks import EDIT_PREFIX
from cm3leon_lightning.serve.cli import build_api, build_parser, build_server
from cm3leon_lightning.serve.requests import KINDS, decode_base64_image, encode_png_base64
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN


def argv(root, *extra):
    return ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan"),
            "--accelerator", "cpu", "--devices", "1", "--compile", "eager", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def client(serve_assets):
    extra = ("--max-batch-size", "4", "--batch-timeout", "1", "--max-payload-mb", "1")
    args = build_parser().parse_args(argv(serve_assets, *extra))
    server = build_server(args)
    with wrap_litserve_start(server) as s, TestClient(s.app) as c:
        deadline = time.monotonic() + 120  # the worker process loads the model first; /health says 503 until then
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield c


def test_health_and_the_three_kinds_of_request(client, serve_assets):
    assert client.get("/health").status_code == 200 and client.get("/health").text == "ok"
    model, vocab = load_checkpoint(serve_assets / "model.ckpt")
    tok, vqgan = TextTokenizer.load(serve_assets / "tok"), VQGAN.from_pretrained(serve_assets / "vqgan").eval()

    r = client.post("/predict", json={"prompt": "a red circle", "num_samples": 2, "seed": 4, "return_codes": True})
    assert r.status_code == 200, r.text
    want = generate_image(model, vocab, [tok.encode("a red circle")], num_samples=2, seed=4, vqgan=vqgan, compile=False)
    assert r.json() == {
        "seed": 4,
        "images": [encode_png_base64(im) for im in want.images[0]],
        "codes": want.codes[0].tolist(),
    }

    r = client.post("/predict", json={"image": png_base64(2), "instruction": "what colour is it", "max_new_tokens": 6})
    codes = vqgan.encode(decode_base64_image(png_base64(2), 16)[None])
    answer = generate_text(model, vocab, codes, tok.encode("what colour is it"), max_new_tokens=6, compile=False)
    assert r.status_code == 200 and r.json() == {"text": tok.decode(answer[0])}

    r = client.post("/predict", json={"image": png_base64(2), "edit": "make it blue", "num_samples": 2, "seed": 1})
    want = edit_image(model, vocab, codes, [tok.encode("make it blue")], tok.encode(EDIT_PREFIX), num_samples=2,
                      seed=1, vqgan=vqgan)  # fmt: skip
    assert r.status_code == 200 and r.json() == {"seed": 1, "images": [encode_png_base64(im) for im in want.images[0]]}


def test_a_malformed_body_gets_422_naming_the_field(client):
    r = client.post("/predict", json={"prompt": "a red circle", "num_samples": 0, "colour": "red"})
    assert r.status_code == 422
    assert {tuple(e["loc"][-1:]) for e in r.json()["detail"]} == {("num_samples",), ("colour",)}
    r = client.post("/predict", json={"image": "aGk=", "rows": "1:2"})  # forgot infill: was "Extra inputs are ..."
    assert r.status_code == 422 and [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [
        (["body", "image", "rows"], "rows is not a field of an image-to-text request, which takes image, instruction, "
         "layout, max_new_tokens, method, temperature, top_p, seed; rows belongs to an infilling request (with infill)")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"prompt": "a red circle", "cfg": NaN}', "cfg"),  # Python's JSON reader takes these; strict JSON cannot
        ('{"prompt": "a red circle", "temperature": -Infinity}', "temperature"),  # carry them back: FastAPI's 422
        ('{"prompt": "a red circle", "num_samples": 1e400}', "num_samples"),  # failed as a 500 with a traceback
        ('{"prompt": "a \\udfff circle"}', "prompt"),
        ('{"prompt": " \\n\\t"}', "prompt"),  # nothing left after cleaning, as cm3leon prepare cleans captions
        ('{"image": "aGk=", "instruction": "\\u0000 "}', "instruction"),
        ('{"image": "aGk=", "edit": "x", "colour": "' + "y" * 100_000 + '"}', "colour"),  # not echoed back whole
    ],
)
def test_non_standard_json_gets_a_json_422_naming_the_field(client, body, field):
    r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and [e["loc"][-1] for e in r.json()["detail"]] == [field]
    assert len(r.content) < 1000


@pytest.mark.parametrize(
    "body, error",
    [
        ('{"prompt": "a red circle", "cfg": NaN}',  # was "Input should be less than or equal to 100"
         {"type": "finite_number", "loc": ["body", "prompt", "cfg"], "msg": "cfg must be a number in [0, 100], not NaN",
          "input": "nan"}),
        ('{"image": "aGk=", "top_p": -Infinity}',
         {"type": "finite_number", "loc": ["body", "image", "top_p"],
          "msg": "top_p must be a number in (0, 1], not -Infinity", "input": "-inf"}),
        ('{"prompt": "a red circle", "top_k": 1e400}',  # was "Input should be a finite number"
         {"type": "finite_number", "loc": ["body", "prompt", "top_k"], "msg": "top_k must be an integer >= 1, not "
          "Infinity", "input": "inf"}),
        ('{"prompt": "a red circle", "num_samples": true}',  # was read as 1 sample
         {"type": "number_type", "loc": ["body", "prompt", "num_samples"],
          "msg": "num_samples must be an integer in [1, 64], not true", "input": True}),
        # was "image.prompt: Extra inputs are not permitted"; the whole sentence comes back, not 200 characters of it
        ('{"prompt": "a red circle", "image": "aGk="}',
         {"type": "request_kind", "loc": ["body"], "msg": f"prompt and image cannot be sent together: a request has "
          f"either {KINDS}", "input": {"prompt": "a red circle", "image": "aGk="}}),
        ('{"seed": 3}',  # was "prompt.prompt: Field required"
         {"type": "request_kind", "loc": ["body"], "msg": f"the request has none of prompt, image or infill: it needs "
          f"either {KINDS}", "input": {"seed": 3}}),
    ],
)  # fmt: skip
def test_a_non_finite_number_or_a_body_of_no_single_kind_gets_one_sentence(client, body, error):
    r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json() == {"detail": [error]}


@pytest.mark.parametrize(
    "headers, body, msg",
    [
        # curl -d without -H: a form's type; FastAPI did not read the JSON and blamed the field prompt
        ({"Content-Type": "application/x-www-form-urlencoded"}, '{"prompt": "a red circle"}',
         "body: not read as JSON: send the header Content-Type: application/json "
         "(got 'application/x-www-form-urlencoded')"),
        ({}, '{"prompt": "a red circle"}', "body: not read as JSON: send the header Content-Type: application/json "
         "(it had none)"),
        ({"Content-Type": "application/json"}, '[{"prompt": "a red circle"}]',
         'body: must be a JSON object, e.g. {"prompt": "a red circle"}'),
    ],
)  # fmt: skip
def test_a_body_that_is_not_a_json_object_gets_a_422_saying_so(client, headers, body, msg):
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == 422 and r.json() == {"detail": [{"type": "body_not_json_object", "loc": ["body"],
                                                             "msg": msg}]}  # fmt: skip


def test_a_body_over_max_payload_mb_gets_413(client):
    """The body was unbounded: a 20 MB prompt held the worker for 30 seconds and 2.6 GB."""
    r = client.post("/predict", json={"prompt": "a" * 2**20})
    assert r.status_code == 413 and r.json() == {"detail": "Payload too large"}


def test_concurrent_requests_share_a_batch_and_a_bad_one_is_answered_alone(client, serve_assets):
    model, vocab = load_checkpoint(serve_assets / "model.ckpt")
    tok = TextTokenizer.load(serve_assets / "tok")
    bodies = [
        {"prompt": "a blue square", "method": "greedy", "num_samples": 1, "return_codes": True},
        {"prompt": "a red circle " * 80, "method": "greedy", "num_samples": 1},  # too long for the context
        {"prompt": "two green triangles", "method": "greedy", "num_samples": 1, "return_codes": True},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert "max_seq_len=256" in responses[1].json()["detail"]
    for body, r in zip(bodies[::2], responses[::2]):
        want = generate_image(model, vocab, [tok.encode(body["prompt"])], method="greedy", compile=False)
        assert r.json()["codes"] == want.codes[0].tolist()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "missing.ckpt"], "--ckpt: not found: missing.ckpt"),
        (["--devices", "two"], "--devices must be a number or auto"),
        # a missing CLIP file failed in the worker: two tracebacks and exit status 1
        (
            ["--clip", "cm3leon-clip-tiny", "--clip-pretrained", "nowhere/clip.safetensors"],
            "--clip-pretrained: not found",
        ),
        (["--port", "80"], "--port must lie in [1024, 65535]"),  # LitServe's refusal was a traceback
        (["--host", "localhost"], "--host must be one of 0.0.0.0, 127.0.0.1, ::"),
        (["--num-samples", "20"], "--num-samples 20 exceeds --max-num-samples 16"),
        (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--cfg", "nan"], "--cfg must lie in [0, 100], got nan"),  # a NaN default drew code 0 at every step
        (["--image-cfg", "-1"], "--image-cfg must lie in [0, 100]"),
        (["--timeout", "-1"], "--timeout must be > 0"),
        (["--max-payload-mb", "0"], "--max-payload-mb must be a number of at least 1 KiB (0.001), got 0.0"),
        (["--max-payload-mb", "inf"], "--max-payload-mb must be a number of at least 1 KiB (0.001), got inf"),
        (["--max-payload-mb", "1e-9"], "--max-payload-mb must be a number of at least 1 KiB (0.001), got 1e-09"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--compile", "fused-graph"], "fused-graph"),  # a CUDA mode on this CPU: refused before any worker starts
    ],
)
def test_bad_arguments_exit_2_with_one_line(serve_assets, capsys, extra, message):
    assert cm3leon_main(["serve", *argv(serve_assets, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cm3leon serve: error: ") and message in err and "\n" not in err


def test_help_shows_each_default_once(monkeypatch):
    """``--tokenizer``'s help ended "(default: the model directory's) (default: None)", ``--text-cfg``'s "(paper 7.5)
    (default: 7.5)", and options without a default (``--clip``, ``--k``, the required ``--ckpt``) "(default: None)"."""
    monkeypatch.setenv("COLUMNS", "300")  # one line per help text
    lines = build_parser().format_help().splitlines()
    assert "(default: None)" not in "\n".join(lines)
    assert [line for line in lines if line.count("default") > 1] == []
    helps = {line.split()[0]: " ".join(line.split()[2:]) for line in lines if line.startswith("  --")}
    assert helps["--ckpt"] == "CM3LeonModule checkpoint (.ckpt or FSDP's sharded directory) or model directory"
    assert lines[lines.index("  --tokenizer TOKENIZER") + 1].strip() == (
        "text tokenizer: tokenizer.json or its directory (default: the model directory's)"
    )
    assert helps["--k"] == "documents retrieved per request by default (with --retrieve: 2, or all of a bank of fewer)"
    assert helps["--top-k"] == "keep the k most likely ids (default: all)"
    assert helps["--text-cfg"] == "edit requests: text guidance scale (the paper's) (default: 7.5)"
    assert helps["--cfg"] == "classifier-free guidance scale (default: 3.0)"
    assert lines[lines.index("  --attention {sdpa,flex}") + 1].strip() == "attention implementation (default: sdpa)"


def test_zero_devices_are_refused(serve_assets):
    """``--devices 0`` on a GPU gave LitServe no inference worker, and it waited for one forever (on the CPU it is
    ignored): refused before anything starts."""
    with pytest.raises(ValueError, match="--devices must be a number or auto, at least 1; got '0'"):
        build_server(build_parser().parse_args(argv(serve_assets, "--devices", "0")))


@pytest.mark.parametrize(
    "extra, available, count, message",
    [
        (["--accelerator", "cuda"], False, 0, "--accelerator cuda: CUDA is not available on this machine (no GPU or "
         "driver); use cpu or auto"),
        (["--accelerator", "cuda", "--devices", "3"], True, 2, "--devices 3: this machine has 2 CUDA device(s)"),
        (["--accelerator", "auto", "--devices", "2"], True, 1, "--devices 2: this machine has 1 CUDA device(s)"),
    ],
)  # fmt: skip
def test_a_gpu_this_machine_lacks_is_one_line(serve_assets, capsys, monkeypatch, extra, available, count, message):
    """--accelerator cuda without a GPU printed "Uvicorn running" and then a traceback "num_api_servers must be
    greater than 0" that never named the flag; refused now before anything starts (main prints it in one line, exit
    status 2), as a missing GPU index is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    args = [a for a in argv(serve_assets) if a not in ("--accelerator", "cpu", "--devices", "1")]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_server(build_parser().parse_args([*args, *extra]))
    import litserve

    from cm3leon_lightning.serve import cli

    def started(*a, **k):
        raise AssertionError("the server was started")

    monkeypatch.setattr(litserve.LitServer, "run", started)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    assert cm3leon_main(["serve", *args, *extra]) == 2
    assert capsys.readouterr().err == f"cm3leon serve: error: {message}\n"


def test_clip_without_vqgan_is_refused(serve_assets, capsys):
    args = ["--ckpt", str(serve_assets / "model.ckpt"), "--tokenizer", str(serve_assets / "tok"), "--clip", "x"]
    assert cm3leon_main(["serve", *args]) == 2
    assert "--clip re-ranks decoded images (needs --vqgan) or retrieves (needs --retrieve)" in capsys.readouterr().err


def test_a_model_directory_brings_its_tokenizers(serve_assets, tmp_path, capsys):
    """``--ckpt`` an exported model directory: ``--tokenizer`` / ``--vqgan`` come from it, and the worker loads the
    checkpoint's weights; a plain checkpoint without ``--tokenizer`` is refused in one line."""
    export_model(serve_assets / "model.ckpt", tmp_path / "m", serve_assets / "tok", serve_assets / "vqgan")
    api = build_api(build_parser().parse_args(["--ckpt", str(tmp_path / "m"), "--accelerator", "cpu"]))
    assert (api.tokenizer_path, api.vqgan_path) == (str(tmp_path / "m" / "tokenizer"), str(tmp_path / "m" / "vqgan"))
    api.setup("cpu")
    reference, _ = load_checkpoint(serve_assets / "model.ckpt")
    got, want = api.model.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want) and api.vqgan is not None
    assert cm3leon_main(["serve", "--ckpt", str(serve_assets / "model.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cm3leon serve: error: --tokenizer is required: --ckpt is not a model directory (cm3leon export " \
        "--tokenizer bundles one)"  # fmt: skip


def test_the_command_serves_over_a_real_socket(serve_assets, tmp_path):
    """``cm3leon serve`` as a user runs it: a process listening on a port, /health then a request over TCP."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "cm3leon_lightning", "serve", *argv(serve_assets, "--host", "127.0.0.1", "--port",
                                                                     str(port))]  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
    )
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                if health == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        assert health == b"ok", (tmp_path / "server.log").read_text()[-3000:]
        body = json.dumps({"prompt": "a red circle", "method": "greedy", "num_samples": 1, "return_codes": True})
        url, headers = f"http://127.0.0.1:{port}/predict", {"Content-Type": "application/json"}
        req = urllib.request.Request(url, body.encode(), headers=headers, method="POST")
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert len(answer["images"]) == 1 and len(answer["codes"][0]) == 64
        assert not (tmp_path / "client.py").exists()  # LitServe's client file is not written into the cwd
        # SIGTERM stops the whole server: no API-server or inference-worker process outlives it.
        proc.terminate()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        assert not group_alive(proc.pid), "cm3leon serve left processes running after SIGTERM"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def start_command(serve_assets, tmp_path, ignore_sigint=False, *extra):
    """``cm3leon serve`` on a free port in its own process group (optionally with SIGINT ignored, as ``cmd &`` in a
    script starts it); returns the process, its port and its log, once /health says ok."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "cm3leon_lightning", "serve", *argv(serve_assets, "--host", "127.0.0.1", "--port",
                                                                     str(port), *extra)]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read() == b"ok":
                return proc, port, log
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(log.read_text()[-3000:])


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_answers_the_requests_in_flight(serve_assets, tmp_path, signame):
    """Ctrl+C signals every process of the terminal's group, and so does ``kill -- -PGID``: the inference worker
    (SIGINT, SIGTERM) and LitServe's manager process that carries its answers (SIGTERM) died at once, and every
    request in flight waited 30 seconds for the connection to drop. Now each is answered, and no process is left.
    SIGINT here reaches a server started with SIGINT ignored: only its API server stopped, and the rest waited."""
    import json
    import os
    import signal
    import urllib.request

    # The signal comes while LitServe holds all 12 requests in a batch still filling (it waits 3 s for 16): the
    # worker counted itself idle there and died at once on SIGTERM.
    args = ("--max-batch-size", "16", "--batch-timeout", "3")
    proc, port, log = start_command(serve_assets, tmp_path, signame == "SIGINT", *args)
    try:
        url, headers = f"http://127.0.0.1:{port}/predict", {"Content-Type": "application/json"}

        def post(seed):
            body = json.dumps({"prompt": "a red circle", "num_samples": 16, "cfg": 2.0, "seed": seed}).encode()
            try:
                return urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=25).status
            except OSError as e:
                return repr(e)

        with ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(post, seed) for seed in range(12)]
            time.sleep(1.0)
            os.killpg(proc.pid, getattr(signal, signame))
            assert [a.result() for a in answers] == [200] * 12, log.read_text()[-3000:]
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        assert not group_alive(proc.pid), "cm3leon serve left processes running"
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_shutdown_stops_litserve_s_monitoring_thread_first_and_runs_once() -> None:
    """LitServe's monitoring thread outlived the shutdown: waking after the manager was closed, it asked the closed
    manager for the shutdown event and logged a BrokenPipeError traceback (the SIGINT test above, under load). Its
    shutdown is also called from that thread when a worker dies; it must run once, after the thread has stopped."""
    import threading

    from cm3leon_lightning.serve.cli import MONITOR_THREAD, shutdown_once

    calls: list[tuple[str, bool]] = []
    setters: list[str] = []

    class ProxyEvent(threading.Event):
        """Records the thread that sets it: the manager proxy's connection of the thread whose wait() Ctrl+C
        interrupted is still busy with it, so setting it there hung the shutdown."""

        def set(self) -> None:
            setters.append(threading.current_thread().name)
            super().set()

    class Server:
        monitor_internal = 0.05

        def __init__(self) -> None:
            self._shutdown_event = ProxyEvent()

        def _perform_graceful_shutdown(self, manager: object, workers: object, reason: str = "normal") -> None:
            calls.append((reason, monitor.is_alive()))

    server = Server()
    monitor = threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(server._shutdown_event.is_set, True)],
                               name=MONITOR_THREAD, daemon=True)  # fmt: skip
    monitor.start()
    shutdown_once(server)
    first = threading.Thread(target=server._perform_graceful_shutdown, args=(None, {}, "keyboard_interrupt"))
    first.start()
    server._perform_graceful_shutdown(None, {}, "worker died")  # the monitoring thread's call, racing
    first.join()
    assert len(calls) == 1 and calls[0][1] is False  # once, with the monitoring thread already stopped
    assert server._shutdown_event.is_set() and not monitor.is_alive()
    assert len(setters) == 1 and setters[0] not in ("MainThread", first.name, MONITOR_THREAD)

    class Other:  # a LitServe without these private names is left as it is
        pass

    other = Other()
    shutdown_once(other)
    assert vars(other) == {}
