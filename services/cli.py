"""The ``fairway`` command: run one service, the whole system, or the tools.

Imports are lazy so ``fairway gateway`` never loads torch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

SERVICES = ("gateway", "scorer", "scheduler", "gpu-worker", "cpu-worker")


def _settings():
    from services.logs import configure
    from services.settings import get_settings

    settings = get_settings()
    return settings, configure


def _use_uvloop() -> None:
    """uvloop (a dependency of uvicorn[standard]) when installed: every service spends
    most of its time in socket I/O, which uvloop does in C at about half the CPU."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_service(name: str) -> int:
    from services.runtime import catch_early_stops

    catch_early_stops()
    settings, configure = _settings()
    configure(settings.log_level, settings.log_format, service=name)
    _use_uvloop()
    if name != "gateway":
        from services.metrics import serve

        serve(name, settings.metrics_port, settings.metrics_host)
    if name == "gateway":
        from services.gateway.app import serve

        asyncio.run(serve(settings))
    elif name == "scorer":
        from services.scorer.service import main

        asyncio.run(main(settings))
    elif name == "scheduler":
        from services.scheduler.service import main

        asyncio.run(main(settings))
    elif name == "cpu-worker":
        from services.cpu_worker.service import main

        asyncio.run(main(settings))
    elif name == "gpu-worker":
        from services.gpu_worker.service import main

        asyncio.run(main(settings))
    return 0


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), 0.5).close()
        return True
    except OSError:
        return False


def ensure_infra(settings) -> dict:
    """Start Redis and RabbitMQ on loopback when nothing answers at the configured URLs;
    the servers started, by name."""
    from services.localinfra import RabbitServer, RedisServer, up_infra_dir

    started = {}
    base = up_infra_dir(settings.cache_dir)
    if not _reachable(settings.redis_url, 6379):
        port = urlparse(settings.redis_url).port or 6379
        redis = RedisServer(workdir=base / "redis", port=port)
        redis.start()
        started["redis-server"] = redis
        print(f"fairway: started redis-server on 127.0.0.1:{port} (pid {redis.proc.pid})",
              file=sys.stderr)
    if not _reachable(settings.amqp_url, 5672):
        port = urlparse(settings.amqp_url).port or 5672
        rabbit = RabbitServer(workdir=base / "rabbitmq", port=port)
        rabbit.start()
        started["rabbitmq-server"] = rabbit
        print(f"fairway: started rabbitmq-server on 127.0.0.1:{port} (pid {rabbit.proc.pid})",
              file=sys.stderr)
    return started


def up(args: argparse.Namespace) -> int:
    """All services as local processes, each restarted when it exits (``--no-restart``:
    stop them all instead); Ctrl-C or SIGTERM stops them all gracefully."""
    settings, configure = _settings()
    configure(settings.log_level, settings.log_format, service="up")
    servers = {} if args.no_infra else ensure_infra(settings)
    env = dict(os.environ)
    if args.engine:
        env["FAIRWAY_ENGINE"] = args.engine
    if not settings.api_keys and not settings.api_keys_file:
        env["FAIRWAY_API_KEYS"] = "default:sk-fairway-dev"
        print("fairway: no API keys configured; using tenant 'default' with key sk-fairway-dev",
              file=sys.stderr)
    # Build the default model once, before workers and scorer race to do it.
    from services.models import resolve_model_path

    resolve_model_path(settings.model_path, settings.cache_dir)
    plan = ["scheduler", "scorer"] + ["cpu-worker"] * args.cpu_workers
    plan += ["gpu-worker"] * args.gpu_workers + ["gateway"]
    from services.supervise import Child, Supervisor

    children = []
    for i, name in enumerate(plan):
        child = dict(env)
        if name.endswith("worker") and settings.metrics_port != 0:
            # Several workers of a pool: each its own metrics port (default + 10 n).
            from services.metrics import WORKER_PORT_STRIDE, metrics_port

            n = plan[:i].count(name)
            child["FAIRWAY_METRICS_PORT"] = str(metrics_port(name, settings.metrics_port)
                                                + WORKER_PORT_STRIDE * n)
        if name == "gateway":
            # The same name in every life: a restarted gateway frees its last life's
            # admission slots and cancels its requests at once.
            child["FAIRWAY_INSTANCE_ID"] = f"{settings.instance_id}-gateway"
        children.append(Child(name, [sys.executable, "-m", "services.cli", name], child))
    supervisor = Supervisor(children, restart=not args.no_restart)

    def restart_server(child: Child) -> subprocess.Popen:
        server = servers[child.name]
        server.start()
        return server.proc

    # Started above (the services need them first); from here on restarted when they exit.
    started = time.monotonic()
    infra_supervisor = Supervisor(
        [Child(name, [], {}, proc=server.proc, started_at=started) for name, server in servers.items()],
        restart=not args.no_restart, spawn=restart_server)
    print(f"fairway: gateway on http://{settings.host}:{settings.port}", file=sys.stderr)

    stop = {"now": False}

    def on_signal(signum, frame):
        if stop["now"]:  # a second signal while the services stop: their drains end now
            supervisor.signal_all()
        stop["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        while not stop["now"]:
            now = time.monotonic()
            if not (infra_supervisor.poll(now) and supervisor.poll(now)):
                code = 1
                break
            time.sleep(0.5)
    finally:
        supervisor.stop()
        for server in servers.values():
            server.stop()
    return code


def amqp_user(args: argparse.Namespace) -> int:
    """A tenant's RabbitMQ user with the least it needs (its own reply queues, publishing
    requests), on the broker of ``FAIRWAY_AMQP_URL`` on this machine: the node that
    ``fairway up`` started itself when it runs, else the machine's own RabbitMQ."""
    from urllib.parse import unquote

    from services import provision, topology

    settings, _ = _settings()
    vhost = args.vhost or unquote(urlparse(settings.amqp_url).path.lstrip("/")) or "/"
    run = provision.local_rabbitmqctl(settings.amqp_url, settings.cache_dir)
    try:
        provision.provision_rabbitmqctl(
            run, {args.name: (args.password, provision.tenant_grant(args.name))}, vhost)
    except ValueError as exc:
        print(f"fairway amqp-user: {exc}", file=sys.stderr)
        return 2
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        print(f"fairway amqp-user: rabbitmqctl failed: {str(detail).strip()}", file=sys.stderr)
        return 1
    print(f"fairway: RabbitMQ user {args.name!r} may publish requests on vhost {vhost!r} "
          f"and own its reply queues ({topology.REPLY_QUEUE_PREFIX}.{args.name}.*)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run every service as local processes")
    p_up.add_argument("--cpu-workers", type=int, default=1)
    p_up.add_argument("--gpu-workers", type=int, default=0)
    p_up.add_argument("--engine", choices=["model", "echo"], default=None)
    p_up.add_argument("--no-infra", action="store_true",
                      help="do not start Redis/RabbitMQ when they are not reachable")
    p_up.add_argument("--no-restart", action="store_true",
                      help="stop everything when a service exits, instead of restarting it")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service")

    p_user = sub.add_parser(
        "amqp-user", help="create or update a tenant's RabbitMQ user, to publish straight to AMQP")
    p_user.add_argument("name", help="the user, which is the tenant (letters, digits, '_', '-')")
    p_user.add_argument("password")
    p_user.add_argument("--vhost", default=None,
                        help="default: the vhost of FAIRWAY_AMQP_URL ('/' when it names none)")
    sub.add_parser("provision", help="RabbitMQ users, permissions and topology through the "
                                     "management API, from FAIRWAY_PROVISION_* (see services/provision.py)")

    from services import tenant_admin

    tenant_admin.add_arguments(sub.add_parser(
        "tenants", help="add tenants, rotate and revoke their keys, set weights and rate limits"))

    p_pred = sub.add_parser("predictor", help="train and evaluate the output-length predictor")
    pred_sub = p_pred.add_subparsers(dest="predictor_command", required=True)
    from services.scorer import evaluate

    evaluate.add_arguments(pred_sub.add_parser("eval", help="evaluate on a test JSONL"))
    evaluate.add_train_arguments(pred_sub.add_parser("train", help="train an artifact from JSONL"))
    evaluate.add_prepare_arguments(
        pred_sub.add_parser("prepare", help="split a dataset by prompt into train/test JSONL")
    )

    from services.scheduler import sim_cli

    sim_cli.add_arguments(sub.add_parser("simulate", help="replay a trace through the policy"))

    from services.engine import profile

    profile.add_arguments(sub.add_parser("profile-engine", help="measure engine speed constants"))

    p_bench = sub.add_parser("bench", help="benchmarks: serving, engine, GPU kernels")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True)
    for name, help_text in BENCHMARKS.items():
        _bench_module(name).add_arguments(bench_sub.add_parser(name, help=help_text))
    return parser


BENCHMARKS = {
    "serve": "load a running server with a trace or dataset, like `vllm bench serve`",
    "engine": "engine throughput vs sequential and statically batched generate",
    "kernels": "Triton kernels vs their torch references (CUDA)",
    "lora": "engine throughput with many tenant LoRA adapters vs one",
}


def _bench_module(name: str):
    import importlib

    return importlib.import_module(f"services.benchmark.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:  # fast path: no tool imports for a service
        return run_service(argv[0])
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return up(args)
    if args.command == "amqp-user":
        return amqp_user(args)
    if args.command == "tenants":
        from services import tenant_admin

        return tenant_admin.run(args)
    if args.command == "provision":
        from services import provision

        return provision.main()
    if args.command == "predictor":
        from services.scorer import evaluate

        runners = {"eval": evaluate.run, "train": evaluate.run_train, "prepare": evaluate.run_prepare}
        return runners[args.predictor_command](args)
    if args.command == "simulate":
        from services.scheduler import sim_cli

        return sim_cli.run(args)
    if args.command == "bench":
        return _bench_module(args.bench_command).run(args)
    if args.command == "profile-engine":
        from services.engine import profile

        return profile.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
