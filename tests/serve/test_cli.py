"""Flags: generated from EngineConfig / ServerArgs with vLLM's spellings; vLLM-only flags warn."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from jaxllm import cli
from jaxllm.command_line import build_parser, parse_args
from jaxllm.config import DEFAULT_MODEL, option_fields
from serve.args import ServerArgs


def test_every_option_has_a_flag_with_its_doc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside a doc line
    help_text = " ".join(build_parser().format_help().split())
    for _, f in [*option_fields(), *((None, f) for f in dataclasses.fields(ServerArgs))]:
        assert "--" + f.name.replace("_", "-") in help_text, f.name
        assert " ".join(f.metadata["doc"].split()) in help_text, f.name


def test_vllm_spellings_parse_into_the_config() -> None:
    config, args = parse_args([
        "--model", "/models/llama", "--max-model-len", "8k", "-tp", "2", "--no-enable-prefix-caching",
        "--served-model-name", "llama", "llama-alias", "--gpu-memory-utilization", "0.8", "--block-size", "32",
        "--max-num-seqs", "64", "--dtype", "bfloat16", "--seed", "7", "--port", "9000", "--api-key", "k",
        "--allowed-origins", '["http://a", "http://b"]', "--metrics-names", "vllm", "--enable-log-requests",
    ])
    assert config.model.model == "/models/llama" and config.model.max_model_len == 8000
    assert config.parallel.tensor_parallel_size == 2 and not config.cache.enable_prefix_caching
    assert config.model.served_model_name == ["llama", "llama-alias"] and config.cache.block_size == 32
    assert config.cache.gpu_memory_utilization == 0.8 and config.scheduler.max_num_seqs == 64
    assert config.model.dtype == "bfloat16" and config.model.seed == 7
    assert (args.port, args.api_key, args.metrics_names, args.enable_log_requests) == (9000, ["k"], "vllm", True)
    assert args.allowed_origins == ["http://a", "http://b"]


def test_defaults_match_vllm() -> None:
    config, args = parse_args([])
    assert args.port == 8000 and args.allowed_origins == ["*"] and args.allowed_headers == ["*"]
    assert config.cache.enable_prefix_caching and config.cache.block_size == 16
    assert not args.enable_log_requests and args.api_key == []


def test_positional_model_and_api_keys_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAXLLM_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "vllm-env")  # vLLM: `args.api_key or [envs.VLLM_API_KEY]`
    config, args = parse_args(["some/model"])
    assert config.model.model == "some/model" and args.api_key == ["vllm-env"]
    monkeypatch.setenv("JAXLLM_API_KEY", "jaxllm-env")
    assert parse_args([])[1].api_key == ["jaxllm-env", "vllm-env"]
    assert parse_args(["--api-key", "k1", "k2"])[1].api_key == ["k1", "k2"]  # vLLM's api_key: list[str]
    with pytest.raises(TypeError, match="list of keys"):
        ServerArgs(api_key="k1")  # type: ignore[arg-type]


def test_multi_process_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parallel = parse_args(["--distributed-coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1",
                           "-tp", "16"])[0].parallel
    assert (parallel.distributed_coordinator, parallel.num_processes, parallel.process_id) == ("10.0.0.1:1234", 2, 1)
    vllm = parse_args(["--distributed-coordinator", "h:1", "--nnodes", "4", "--node-rank", "3"])[0].parallel
    assert (vllm.num_processes, vllm.process_id) == (4, 3)
    assert parse_args([])[0].parallel.num_processes == 1
    for argv, message in ((["--num-processes", "2"], "needs distributed_coordinator as host:port"),
                          (["--nnodes", "2", "--node-rank", "2", "--distributed-coordinator", "h:1"],
                           r"process_id=2 must be in [0, num_processes=2)")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_vllm_flags_without_meaning_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jaxllm.serve"):
        parse_args(["--trust-remote-code", "--enforce-eager", "--swap-space", "4", "--enable-chunked-prefill",
                    "--distributed-executor-backend", "ray", "--no-enable-chunked-prefill"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    for flag in ("--trust-remote-code", "--enforce-eager", "--swap-space", "--distributed-executor-backend"):
        assert f"{flag} has no effect" in warned


def test_tool_and_reasoning_flags() -> None:
    _, args = parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser) == (True, "hermes", "qwen3")
    _, plain = parse_args([])
    assert (plain.enable_auto_tool_choice, plain.tool_call_parser, plain.reasoning_parser) == (False, None, None)


def test_served_model_name_defaults_to_the_model_as_given_or_the_bundled_models_name() -> None:
    def served(argv: list[str]) -> list[str]:
        return parse_args(argv)[0].model.served_names

    assert parse_args([])[0].model.model == DEFAULT_MODEL
    assert served([]) == ["stories260K"]
    assert served(["org/some-model"]) == ["org/some-model"]
    assert served(["--served-model-name", "mine"]) == ["mine"]


def test_bad_values_are_rejected() -> None:
    for argv in (["--dtype", "int3"], ["--port", "http"], ["--metrics-names", "prom"], ["--no-such-flag"],
                 ["--tool-call-parser", "nope"], ["--reasoning-parser", "nope"],
                 ["--enable-auto-tool-choice"]):  # needs --tool-call-parser, as in vLLM
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_console_script_dispatches_serve(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2 and "jaxllm serve" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--max-model-len" in capsys.readouterr().out


def test_jaxllm_serve_help_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "jaxllm.serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--served-model-name" in result.stdout
