"""vLLM 0.34.0's `vllm serve` flags: every one implemented, refused (exit 2) or warned (one log line), as
docs/vllm-flags.md tells; vLLM's spellings of them; and servers started with them, in groups that do not
conflict (TCP with $VLLM_API_KEY, a Unix socket, TLS), each answering a chat with 200."""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jaxllm import __version__, cli
from jaxllm.command_line import build_parser, parse_args
from jaxllm.models.loader import resolve_dtype
from jaxllm.vllm_flags import VLLM_FLAGS, Arity, Group, VllmFlag, by_group

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "stories", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# One command line per implemented flag of the table (every spelling): each must parse.
IMPLEMENTED_ARGV: dict[str, list[str]] = {
    "--model": ["--model", "org/m"], "--tokenizer": ["--tokenizer", "t"], "--dtype": ["--dtype", "half"],
    "--seed": ["--seed", "3"], "--revision": ["--revision", "main"], "--max-model-len": ["--max-model-len", "1k"],
    "--max-logprobs": ["--max-logprobs", "-1"], "--served-model-name": ["--served-model-name", "a", "b"],
    "--generation-config": ["--generation-config", "vllm"], "--load-format": ["--load-format", "dummy"],
    "--quantization": ["--quantization", "awq"], "-q": ["-q", "fp8_per_block"],
    "--attention-backend": ["--attention-backend", "xla"], "--reasoning-parser": ["--reasoning-parser", "qwen3"],
    "--master-addr": ["--master-addr", "h", "-n", "2"], "--master-port": ["--master-port", "1", "-n", "2"],
    "--nnodes": ["--nnodes", "2", "--master-addr", "h"], "-n": ["-n", "2", "--master-addr", "h"],
    "--node-rank": ["--node-rank", "1", "-n", "2", "--master-addr", "h"],
    "-r": ["-r", "1", "-n", "2", "--master-addr", "h"],
    "--tensor-parallel-size": ["--tensor-parallel-size", "2"], "-tp": ["-tp", "2"],
    "--enable-expert-parallel": ["--enable-expert-parallel"], "-ep": ["-ep"],
    "--block-size": ["--block-size", "32"], "--gpu-memory-utilization": ["--gpu-memory-utilization", "0.5"],
    "--device-memory-utilization": ["--device-memory-utilization", "0.5"],
    "--kv-cache-memory-bytes": ["--kv-cache-memory-bytes", "1000"],
    "--kv-cache-dtype": ["--kv-cache-dtype", "fp8"],
    "--calculate-kv-scales": ["--calculate-kv-scales"],
    "--num-gpu-blocks-override": ["--num-gpu-blocks-override", "8"],
    "--enable-prefix-caching": ["--no-enable-prefix-caching"],
    "--max-num-batched-tokens": ["--max-num-batched-tokens", "2k"], "--max-num-seqs": ["--max-num-seqs", "4"],
    "--async-scheduling": ["--async-scheduling"], "--stream-interval": ["--stream-interval", "2"],
    "--structured-outputs-config": ["--structured-outputs-config", '{"backend": "guidance"}'],
    "--disable-log-stats": ["--disable-log-stats"], "--shutdown-timeout": ["--shutdown-timeout", "5"],
    "--enable-log-requests": ["--enable-log-requests"], "--config": ["--config", "serve.yaml"],
    "--chat-template": ["--chat-template", "{{ 1 }}"],
    "--return-tokens-as-token-ids": ["--return-tokens-as-token-ids"],
    "--enable-auto-tool-choice": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
    "--tool-call-parser": ["--tool-call-parser", "hermes"],
    "--enable-prompt-tokens-details": ["--enable-prompt-tokens-details"],
    "--enable-per-request-metrics": ["--enable-per-request-metrics"],
    "--enable-server-load-tracking": ["--enable-server-load-tracking"],
    "--enable-force-include-usage": ["--enable-force-include-usage"],
    "--enable-tokenizer-info-endpoint": ["--enable-tokenizer-info-endpoint"],
    "--host": ["--host", "::1"], "--port": ["--port", "9"], "--uds": ["--uds", "/tmp/s"],
    "--uvicorn-log-level": ["--uvicorn-log-level", "debug"], "--allow-credentials": ["--allow-credentials"],
    "--allowed-origins": ["--allowed-origins", '["http://a"]'], "--allowed-methods": ["--allowed-methods", "GET"],
    "--allowed-headers": ["--allowed-headers", "X"], "--api-key": ["--api-key", "k"],
    "--ssl-keyfile": ["--ssl-keyfile", "k.pem"], "--ssl-certfile": ["--ssl-certfile", "c.pem"],
    "--ssl-ca-certs": ["--ssl-ca-certs", "ca.pem"], "--ssl-cert-reqs": ["--ssl-cert-reqs", "2"],
    "--ssl-ciphers": ["--ssl-ciphers", "ECDHE-RSA-AES256-GCM-SHA384"], "--root-path": ["--root-path", "/llm"],
    "--enable-request-id-headers": ["--enable-request-id-headers"],
    "--h11-max-incomplete-event-size": ["--h11-max-incomplete-event-size", "65536"],
    "--h11-max-header-count": ["--h11-max-header-count", "64"],
}


def sample_argv(row: VllmFlag, name: str) -> list[str]:
    """A refused or warned flag given with a value that is not harmless."""
    return [name] if row.arity in (Arity.SWITCH, Arity.OPTIONAL) else [name, "x"]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "jaxllm.serve"]


def test_the_docs_page_is_the_table() -> None:
    page = (REPO / "docs" / "vllm-flags.md").read_text()
    rows = re.findall(r"^\| (`.+?`) \| (\w+) \| (.+) \|$", page, flags=re.M)
    expected = [(", ".join(f"`{n}`" for n in f.names), f.group.value,
                 f.why + (f" (accepted: {', '.join(f.harmless)})" if f.harmless else "")) for f in VLLM_FLAGS]
    assert rows == expected


def test_every_implemented_flag_parses_into_the_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = {name for row in by_group(Group.IMPLEMENTED) for name in row.names}
    assert names == set(IMPLEMENTED_ARGV)
    monkeypatch.chdir(tmp_path)  # for --config serve.yaml
    Path("serve.yaml").write_text("max-num-seqs: 2\n")
    defaults = parse_args([])
    for argv in IMPLEMENTED_ARGV.values():
        assert parse_args(argv) != defaults, argv  # each sample value differs from the flag's default
    config, args = parse_args(["--max-logprobs", "-1", "--uds", "/tmp/s", "--ssl-cert-reqs", "2",
                               "--master-addr", "10.0.0.1", "-n", "2", "-r", "1", "--device-memory-utilization", "0.5"])
    assert (config.model.max_logprobs, args.uds, args.ssl_cert_reqs) == (-1, "/tmp/s", 2)
    assert (config.parallel.distributed_coordinator, config.parallel.num_processes) == ("10.0.0.1:29501", 2)
    assert (config.parallel.process_id, config.cache.gpu_memory_utilization) == (1, 0.5)


def test_every_refused_flag_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    for row in by_group(Group.REFUSED):
        for name in row.names:
            with pytest.raises(SystemExit) as exit_info:
                parse_args(sample_argv(row, name))
            assert exit_info.value.code == 2, name
            assert f"jaxllm does not start with {row.flag}" in capsys.readouterr().err, name


def test_harmless_values_of_refused_flags_start_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jaxllm.serve"):
        parse_args(["--no-enable-lora", "--runner", "generate", "--tokenizer-mode", "hf",
                    "--logprobs-mode", "raw_logprobs", "--response-role", "assistant"])
    assert warnings_logged(caplog) == []


def test_every_warned_flag_logs_one_line_and_parses(caplog: pytest.LogCaptureFixture) -> None:
    rows = by_group(Group.WARNED)
    argv = [arg for row in rows for arg in sample_argv(row, row.names[-1])]  # the short spellings too
    with caplog.at_level(logging.WARNING, logger="jaxllm.serve"):
        parse_args(argv)
    assert warnings_logged(caplog) == [f"{row.flag} has no effect in jaxllm ({row.why}); ignored." for row in rows]


def test_vllm_spellings_of_config_flags(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = parse_args(["--structured-outputs-config", '{"backend": "guidance"}',
                            "--structured-outputs-config.disable_any_whitespace", "true",
                            "--structured-outputs-config.disable_additional_properties=True"])
    outputs = config.structured_outputs_config
    assert (outputs.backend, outputs.disable_any_whitespace, outputs.disable_additional_properties) == (
        "guidance", True, True)
    assert parse_args([])[0].structured_outputs_config.backend == "auto"  # vLLM's default
    assert parse_args(["--structured-outputs-config.reasoning_parser", "qwen3"])[1].reasoning_parser == "qwen3"
    _, args = parse_args(["--max_num_seqs", "3", "--enable_force_include_usage"])
    assert args.enable_force_include_usage
    with caplog.at_level(logging.WARNING, logger="jaxllm.serve"):
        parse_args(["--compilation-config.cudagraph_mode", "FULL", "-cc.level=3", "-O3"])
        assert parse_args(["--attention-backend", "FLASHINFER"])[0].model.attention_backend == "auto"
    assert [m.split(" ")[0] for m in warnings_logged(caplog)] == [
        "--compilation-config", "--optimization-level", "--attention-backend"]
    for argv, message in (
        (["--structured-outputs-config.nope", "1"], "--structured-outputs-config: unknown key(s) nope"),
        (["--structured-outputs-config", '{"backend": "xgrammar", "x": 1}'], "unknown key(s) x"),
        (["--structured-outputs-config.disable_any_whitespace", "yes"], "disable_any_whitespace must be a bool"),
        (["--structured-outputs-config.backend", "nope"], "backend must be one of"),
        # vLLM 0.34.0's StructuredOutputsConfig refuses these with its default backend (auto):
        (["--structured-outputs-config.disable_any_whitespace", "true"], "only supported for xgrammar and guidance"),
        (["--structured-outputs-config.disable_additional_properties=true"], "only supported for the guidance"),
        (["--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens", "3"],
         'with --speculative-config {"method": "ngram", "num_speculative_tokens": 3}'),
        (["--enable-per-request-metrics", "--disable-log-stats"], "--enable-per-request-metrics requires engine"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_config_file_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("port: 9001\nmax-num-seqs: 4\nenable-prefix-caching: false\nserved-model-name: [a, b]\n"
                         "structured-outputs-config:\n  backend: guidance\n")
    config, args = parse_args(["--config", str(yaml_file), "--max-num-seqs", "8"])  # the command line wins
    assert (args.port, config.scheduler.max_num_seqs, config.cache.enable_prefix_caching) == (9001, 8, False)
    assert config.model.served_model_name == ["a", "b"] and config.structured_outputs_config.backend == "guidance"
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "serve.json")])


def test_dtype_half_and_float_are_vllms() -> None:
    for flag, dtype in (("half", "float16"), ("float", "float32")):
        name = parse_args(["--dtype", flag])[0].model.dtype
        assert str(resolve_dtype(name, arch=None, platform="cpu")) == dtype  # type: ignore[arg-type]  (auto only)


def test_version_and_clean_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"{__version__}\n"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"{__version__}\n"
    monkeypatch.setenv("COLUMNS", "10000")
    help_text = build_parser().format_help()
    for noise in ("(default: None)", "(default: [])", "(default: {})"):
        assert noise not in help_text
    assert not re.search(r"\(default: [^)]*\)\. \(default:", help_text)  # a default the doc already tells
    assert "Host name or address to listen on (default: all interfaces).\n" in help_text
    assert "--enable-lora" not in help_text and "docs/vllm-flags.md lists each" in help_text  # not 276 more lines


class FlagServer:
    """tests/serve/fake_server.py (the real run_server over a fake engine) started with some flags."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "tests.serve.fake_server", "--disable-frontend-multiprocessing", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_ready(self, client: httpx.Client, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited early:\n" + "".join(self.log)
            try:
                if client.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("server did not become ready:\n" + "".join(self.log))

    def wait_exit(self) -> None:
        self.proc.wait(timeout=30)
        self.reader.join(timeout=5)


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


# Flags that other groups leave alone, with vLLM's spellings; each group adds its own listener.
SHARED_FLAGS = ["--dtype", "half", "--max-logprobs", "-1", "--enable-force-include-usage",
                "--enable-per-request-metrics", "--return-tokens-as-token-ids", "--enable-server-load-tracking",
                "--enable-tokenizer-info-endpoint", "--enable-request-id-headers", "--enable-prompt-tokens-details",
                "--structured-outputs-config.backend", "guidance", "--kv-cache-dtype", "auto"]
WARNED_FLAGS = ["--show-hidden-metrics-for-version", "0.33", "--enforce-eager", "--swap-space", "4",
                "--compilation-config", '{"level": 3}', "--disable-uvicorn-access-log"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory,
            certificate: tuple[Path, Path]) -> Iterator[dict[str, tuple[FlagServer, httpx.Client]]]:
    """Three servers started at once: TCP with $VLLM_API_KEY and the warned flags, a Unix socket, TLS."""
    key, cert = certificate
    uds = tmp_path_factory.mktemp("uds") / "jaxllm.sock"
    tcp_port, tls_port = free_port(), free_port()
    started = {
        "tcp": (FlagServer("--host", "127.0.0.1", "--port", str(tcp_port), *SHARED_FLAGS, *WARNED_FLAGS,
                           env={"VLLM_API_KEY": "sk-vllm", "JAXLLM_API_KEY": ""}),
                httpx.Client(base_url=f"http://127.0.0.1:{tcp_port}")),
        "uds": (FlagServer("--uds", str(uds), *SHARED_FLAGS),
                httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://jaxllm")),
        "tls": (FlagServer("--host", "127.0.0.1", "--port", str(tls_port), "--ssl-keyfile", str(key),
                           "--ssl-certfile", str(cert), *SHARED_FLAGS),
                httpx.Client(base_url=f"https://127.0.0.1:{tls_port}", verify=ssl.create_default_context(
                    cafile=str(cert)))),
    }
    try:
        for server, client in started.values():
            server.wait_ready(client)
        yield started
    finally:
        for server, client in started.values():
            client.close()
            server.proc.terminate()  # all at once: each takes a moment to shut down
        for server, _ in started.values():
            server.wait_exit()


def test_tcp_group_takes_the_key_from_vllm_api_key_and_warns_once_per_flag(
        servers: dict[str, tuple[FlagServer, httpx.Client]]) -> None:
    server, client = servers["tcp"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-vllm"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    warned = [line for line in server.log if "has no effect in jaxllm" in line]
    assert [line.split("jaxllm.serve: ")[1].split(" ")[0] for line in warned] == [
        row.flag for row in by_group(Group.WARNED) if row.flag in WARNED_FLAGS], warned


@pytest.mark.parametrize("group", ["uds", "tls"])
def test_unix_socket_and_tls_groups_answer_chat(group: str,
                                                servers: dict[str, tuple[FlagServer, httpx.Client]]) -> None:
    _, client = servers[group]
    response = client.post("/v1/chat/completions", content=json.dumps(CHAT),
                           headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
