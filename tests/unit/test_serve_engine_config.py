"""The Serve config passes fdllm.EngineConfig fields through to each replica's engine."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest

import fdllm

pytest.importorskip("ray.serve")
from serve.app import ServerConfig  # noqa: E402


def test_engine_fields_pass_through_and_bad_ones_fail_early():
    cfg = ServerConfig.from_args({"model": "m", "engine": {"max_num_seqs": 8, "enforce_eager": True,
                                                           "gpu_memory_utilization": 0.5, "max_model_len": 512}})
    assert cfg.engine_config() == fdllm.EngineConfig(max_num_seqs=8, enforce_eager=True, gpu_memory_utilization=0.5,
                                                      max_model_len=512)
    assert ServerConfig.from_args({"model": "m"}).engine_config() == fdllm.EngineConfig()
    with pytest.raises(ValueError, match="engine: .*kv_fraction"):
        ServerConfig.from_args({"model": "m", "engine": {"kv_fraction": 0.5}})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServerConfig.from_args({"model": "m", "engine": {"gpu_memory_utilization": 1.5}})


def test_fdllm_serve_flags_set_engine_fields():
    from serve.app import engine_overrides, parse_args

    def engine(*flags):
        return ServerConfig.from_args({"model": "m", "engine": engine_overrides(parse_args(["--model", "m", *flags]))})

    assert engine().engine_config() == fdllm.EngineConfig()
    assert engine("--quantization", "int8", "--no-enable-prefix-caching").engine_config() == fdllm.EngineConfig(
        quantization="int8", enable_prefix_caching=False)
    assert engine("--max-num-seqs", "8", "--gpu-memory-utilization", "0.5", "--max-model-len", "512", "--num-pages", "40",
                  "--kv-cache-gib", "1.5", "--enforce-eager", "--no-freeze-gc", "--attention-backend", "torch",
                  "--speculative-lookahead-max-batch", "4", "--deterministic").engine_config() == fdllm.EngineConfig(
        max_num_seqs=8, gpu_memory_utilization=0.5, max_model_len=512, num_pages=40, kv_cache_gib=1.5, enforce_eager=True,
        freeze_gc=False, attention_backend="torch", speculative_lookahead_max_batch=4, deterministic=True)


def test_every_engine_field_is_a_flag():
    """A field added to EngineConfig is a flag at once (with its type), not a copy kept in step by hand."""
    from dataclasses import fields

    from serve.app import parse_args

    flags = parse_args(["--model", "m"])
    assert all(getattr(flags, f.name, "missing") is None for f in fields(fdllm.EngineConfig))
    for bad in (["--max-num-seqs", "eight"], ["--attention-backend", "sdpa"], ["--quantization", "int3"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *bad])


def test_serve_run_key_value_strings_are_read_as_their_fields_types():
    """`serve run serve.app:build_app key=value ...` hands the builder strings."""
    from ray.serve.config import RequestRouterConfig

    from serve.app import build_app
    from serve.routing import SessionAffinityRouter

    args = {"model": "m", "num_replicas": "2", "threshold": "0.9", "block_lookahead": "true", "max_waiting": "4",
            "num_gpus_per_replica": "0", "default_max_tokens": "none", "session_affinity": "yes",
            "session_max_imbalance": "3", "engine": '{"max_num_seqs": 8, "enforce_eager": true}',
            "graceful_shutdown_timeout_s": "90"}
    cfg = ServerConfig.from_args(args)
    assert (cfg.num_replicas, cfg.threshold, cfg.block_lookahead, cfg.max_waiting, cfg.num_gpus_per_replica) == (2, 0.9, True, 4, 0.0)
    assert cfg.default_max_tokens is None and cfg.session_affinity is True and cfg.session_max_imbalance == 3
    assert cfg.engine_config() == fdllm.EngineConfig(max_num_seqs=8, enforce_eager=True)
    assert cfg.model_name is None and ServerConfig.from_args({"model": "m", "model_name": "123"}).model_name == "123"
    deployment = build_app(args)._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_gpus"] == 0.0
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 90.0
    assert build_app({"model": "m"})._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 300.0  # not Serve's 20
    router = deployment._deployment_config.request_router_config
    assert isinstance(router, RequestRouterConfig) and router.request_router_kwargs == {"max_imbalance": 3}
    assert router.get_request_router_class() is SessionAffinityRouter
    assert build_app({"model": "m"})._bound_deployment._deployment_config.request_router_config.request_router_class != (
        router.request_router_class)  # no session_affinity: Serve's default router
    assert ServerConfig.from_args({"model": "m", "model_name": "7"}).model_name == "7"  # a str field stays a str
    for name, bad in (("max_waiting", "four"), ("block_lookahead", "maybe"), ("engine", "[1]"), ("threshold", "")):
        with pytest.raises(ValueError, match=f"serve option {name}="):
            ServerConfig.from_args({"model": "m", name: bad})


@pytest.mark.parametrize("name", ["default_max_tokens", "num_replicas", "max_waiting", "max_body_bytes", "max_prompt_chars"])
def test_a_count_below_one_is_refused_by_its_name(name):
    """0 would read as "unset" where the count is used; the message names the one field at fault."""
    with pytest.raises(ValueError, match=f"^{name} must be >= 1, got 0$"):
        ServerConfig(model="m", **{name: 0})
    assert getattr(ServerConfig(model="m", **{name: 1}), name) == 1


def test_an_empty_api_key_is_refused_not_an_open_server():
    """`--api-key "$UNSET_VARIABLE"` passes an empty string: the server would have run without a key."""
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerConfig(model="m", api_key="")
    assert ServerConfig(model="m", api_key="k").api_key == "k" and ServerConfig(model="m").api_key is None


@pytest.mark.parametrize("flags,needle", [
    (["--max-num-seqs", "0"], "max_num_seqs"), (["--api-key", ""], "api_key"), (["--num-replicas", "0"], "num_replicas must be >= 1, got 0"),
    (["--default-max-tokens", "-3"], "default_max_tokens must be >= 1, got -3"),
    (["--port", "0"], "port"), (["--port", "65536"], "port"), (["--port", "-1"], "port"),
    (["--threshold", "1.5"], "threshold"), (["--threshold", "0"], "threshold"), (["--threshold", "nan"], "threshold"),
    (["--model", ""], "model is empty"),  # read as the working directory
    (["--model", "assets"], "model: no config.json"), (["--model", "no/such/checkpoint"], "no/such/checkpoint: no such checkpoint directory"),
    (["--num-gpus-per-replica", "-1"], "num_gpus"),  # Serve's own check of the deployment's options
    # what the checkpoint's 32-token blocks or the replicas' device cannot run: each replica failed to start
    (["--max-prefill-tokens", "4"], "max_prefill_tokens (4) must be >= block_size (32)"),
    (["--attention-backend", "flash_attn"], "needs KV pages of a multiple of"),
    (["--quantization", "fp8", "--device", "cpu"], "'fp8' needs a CUDA GPU"),
])
def test_fdllm_serve_refuses_bad_options_before_starting_ray(flags, needle, monkeypatch, capsys):
    import ray

    from serve import app

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the options were checked"))
    with pytest.raises(SystemExit) as e:
        app.main(["--model", "assets/tiny-ar-base", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_fdllm_serve_refuses_a_default_mode_the_checkpoint_cannot_decode(qwen2_dir, monkeypatch, capsys):
    """A plain AR checkpoint without a mask token, served with a diffusion or speculative default: every
    request that gave no mode would be refused, so fdllm-serve says so before Ray starts. With an AR
    default, or none (AR for such a checkpoint), it starts."""
    import ray

    from serve import app

    class RayStarted(Exception):
        pass

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(RayStarted()))
    for mode in ("diffusion", "speculative"):
        with pytest.raises(SystemExit) as e:
            app.main(["--model", str(qwen2_dir), "--default-mode", mode])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"default_mode '{mode}' needs a mask token and {qwen2_dir} has none" in err, err
    for flags in (["--default-mode", "ar"], []):
        with pytest.raises(RayStarted):
            app.main(["--model", str(qwen2_dir), *flags])
    with pytest.raises(RayStarted):  # the world's AR base has |<MASK>| in its vocabulary: diffusion is its user's call
        app.main(["--model", "assets/tiny-ar-base", "--default-mode", "diffusion"])


@pytest.mark.parametrize("field,value", [("metrics_interval_s", 0), ("metrics_interval_s", -2.0),
                                         ("metrics_interval_s", float("inf")), ("metrics_interval_s", float("nan")),
                                         ("threshold", 0.0), ("threshold", 1.01), ("model", ""), ("model", " "),
                                         ("default_mode", "beam"), ("default_mode", ""), ("device", "gpu"),
                                         ("device", "cuda:x"), ("device", ""), ("dtype", "fp8")])
def test_serve_options_a_replica_would_refuse_or_spin_on_fail_in_the_builder(field, value):
    """`serve run` / `serve deploy` build the config before any replica starts: these fail there."""
    with pytest.raises(ValueError, match=field):
        ServerConfig.from_args({"model": "m", field: value})
    with pytest.raises(ValueError, match=field):
        ServerConfig.from_args({"model": "m", field: str(value)})  # as `serve run ... key=value` sends it


def test_a_misspelt_autoscaling_key_is_refused_and_a_starved_batch_is_said(caplog):
    """Serve's AutoscalingConfig takes `min_replica` without a word (and autoscales from 1 to 1)."""
    with pytest.raises(ValueError, match=r"autoscaling_config: unknown keys \['min_replica'\]"):
        ServerConfig.from_args({"model": "m", "autoscaling_config": '{"min_replica": 2, "max_replicas": 4}'})
    ServerConfig.from_args({"model": "m", "autoscaling_config": '{"min_replicas": 2, "max_replicas": 4}'})
    assert "never fills" not in caplog.text
    ServerConfig(model="m", max_ongoing_requests=8, engine={"max_num_seqs": 64})
    assert "max_ongoing_requests 8 < the engine's max_num_seqs 64" in caplog.text


@pytest.fixture
def deployments(monkeypatch) -> list:
    """fdllm-serve's main without Ray: what it hands `serve.run`, recorded."""
    import ray
    from ray import serve

    deployed = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(serve, "start", lambda *a, **k: None)
    monkeypatch.setattr(serve, "run", lambda target, **k: deployed.append(target))
    return deployed


def test_replicas_that_fail_to_start_are_one_line_with_their_reason(deployments, monkeypatch, capsys):
    """Serve's own error says "Failed to update the deployments ['FdllmServer']"; the reason (a KV cache
    that does not fit, an out-of-memory GPU) is the last line of the replica's traceback in Serve's status."""
    from ray import serve

    from serve import app

    traceback = "Traceback (most recent call last):\n  File \"engine.py\", line 166\nValueError: the KV cache does not fit\n"
    status = SimpleNamespace(applications={"fdllm": SimpleNamespace(deployments={"FdllmServer": SimpleNamespace(message=traceback)})})
    monkeypatch.setattr(serve, "status", lambda: status)

    def run(*a, **k):
        raise RuntimeError("Deploying application fdllm failed: Failed to update the deployments ['FdllmServer'].")

    monkeypatch.setattr(serve, "run", run)
    with pytest.raises(SystemExit) as e:
        app.main(["--model", "assets/tiny-ar-base"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == "fdllm-serve: error: the replicas failed to start: ValueError: the KV cache does not fit\n"


def test_fdllm_serve_builds_its_config_once(deployments, monkeypatch):
    """main checks the options and deploys that same config: one ServerConfig, not a second built
    from the same options (which could disagree, e.g. a relative path read in another directory)."""
    from serve import app

    built, deployed = [], deployments
    from_args = ServerConfig.from_args.__func__
    monkeypatch.setattr(app.ServerConfig, "from_args", classmethod(lambda cls, a: built.append(from_args(cls, a)) or built[-1]))
    app.main(["--model", "assets/tiny-ar-base", "--threshold", "0.7", "--port", "8123", "--default-mode", "speculative"])
    assert len(built) == 1 and len(deployed) == 1
    (args,) = deployed[0]._bound_deployment.init_args
    assert args == asdict(built[0]) and args["threshold"] == 0.7 and args["default_mode"] == "speculative"


def test_every_server_field_is_a_flag_of_fdllm_serve(deployments):
    """docs/serve.md: Serve's deployment options (and the rest of ServerConfig) are fdllm-serve flags too;
    only --num-replicas was. Each reaches the deployment fdllm-serve runs."""
    from dataclasses import fields

    from serve import app

    parsed = vars(app.parse_args(["--model", "m"]))
    for f in fields(ServerConfig):
        if f.name not in ("engine", "fault_injection"):
            assert f.name in parsed or f"server_{f.name}" in parsed, f.name
    app.main(["--model", "assets/tiny-ar-base", "--autoscaling-config", '{"min_replicas": 1, "max_replicas": 3}',
              "--max-ongoing-requests", "256", "--max-queued-requests", "64", "--graceful-shutdown-timeout-s", "900",
              "--max-waiting", "32", "--no-use-sub-block-cache", "--session-max-imbalance", "2"])
    deployment = deployments[0]._bound_deployment
    config = deployment._deployment_config
    assert (config.autoscaling_config.max_replicas, config.max_ongoing_requests, config.max_queued_requests,
            config.graceful_shutdown_timeout_s) == (3, 256, 64, 900.0)
    (args,) = deployment.init_args
    assert (args["max_waiting"], args["use_sub_block_cache"], args["session_max_imbalance"]) == (32, False, 2)


def test_a_requests_mode_else_the_servers_default_mode_decides():
    """A request's own mode wins; a request without one (or with null, as the openai client sends an unset
    field) gets the server's default mode, which is the engine's (Engine.default_mode: diffusion for a
    block-diffusion checkpoint, AR for a plain AR one; test_engine holds that) unless ServerConfig sets it."""
    import json

    from serve.protocol import CompletionRequest, parse_request

    def mode_of(body: dict, server_default: str) -> str:
        request = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x"} | body).encode())
        return request.sampling_params(16, server_default, default_block_lookahead=True).mode

    assert mode_of({}, "ar") == "ar" and mode_of({"mode": None}, "ar") == "ar" and mode_of({}, "diffusion") == "diffusion"
    assert mode_of({"mode": "diffusion"}, "ar") == "diffusion" and mode_of({"mode": "ar"}, "speculative") == "ar"
    request = parse_request(CompletionRequest, b'{"model": "m", "prompt": "x"}')
    assert not request.sampling_params(16, "ar", default_block_lookahead=True).block_lookahead  # diffusion's alone


@pytest.mark.parametrize("host,flag,env,needles", [
    ("127.0.0.1", None, None, []),
    ("localhost", None, None, []),
    ("::1", None, None, []),
    ("0.0.0.0", None, None, ["without an API key"]),
    ("::", None, None, ["without an API key"]),
    ("10.0.0.5", None, "k", []),
    ("0.0.0.0", "k", None, ["command line"]),
])
def test_fdllm_serve_warns_of_an_open_port_and_a_key_in_its_command_line(host, flag, env, needles):
    """An operator serving on 0.0.0.0 without a key, or passing the key as a flag (visible in `ps`), is told."""
    from serve.app import exposure_warnings

    warnings = exposure_warnings(host, flag, env)
    assert len(warnings) == len(needles) and all(n in w for n, w in zip(needles, warnings)), warnings
