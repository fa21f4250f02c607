"""`primasim serve`: an OpenAI-compatible HTTP server on the runtime (primasim.serve)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import Any

import uvicorn

from primasim.core.cluster import load_cluster
from primasim.core.errors import PlanError, SpecError
from primasim.core.io import atomic_write_text
from primasim.core.model_sources import load_model
from primasim.core.plan import Plan
from primasim.runtime.head import RunOptions, cached_random_weights, open_weights
from primasim.runtime.tokenizer import load_tokenizer
from primasim.runtime.worker import is_loopback
from primasim.serve.app import Served, build_app
from primasim.serve.engine import Engine, EngineOptions, plan_for_runtime
from primasim.serve.protocol import Limits

from . import HELP
from .options import add_option_arg, parse_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help=HELP["serve"],
        description="Plan MODEL on CLUSTER, start the workers once (weights loaded, steps compiled, kept warm) and "
                    "serve /v1/models, /v1/completions and /v1/chat/completions (SSE streaming) with concurrent "
                    "requests in flight on the plan's ring. A device that leaves is planned around: the survivors "
                    "take over and in-flight requests continue after a delay.")
    p.add_argument("--cluster", help="built-in cluster name (e.g. home-emu, local) or a cluster TOML path")
    p.add_argument("--model", help="weights: a GGUF file or a directory with config.json + *.safetensors")
    p.add_argument("--random-weights", action="store_true",
                   help="MODEL is a catalogue name: generate random weights for it once into the cache and serve those")
    p.add_argument("--format", choices=("safetensors", "gguf"), default=None, help="format for --random-weights")
    p.add_argument("--quant", help="--random-weights: quantisation (default: the catalogue's)")
    p.add_argument("--plan", metavar="FILE", help="plan JSON (default: plan with --system)")
    p.add_argument("--system", default="prima", help="planner for the start and for re-planning (default prima)")
    add_option_arg(p, "planner option (repeatable)")
    p.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8000, loopback only; port 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("PRIMASIM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default $PRIMASIM_API_KEY); needed to listen "
                        "beyond loopback unless --insecure")
    p.add_argument("--insecure", action="store_true", help="listen beyond loopback without an API key")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the model's name)")
    p.add_argument("--slots", type=int, default=None, help="requests in flight at once (default: devices in the ring)")
    p.add_argument("--n-ctx", type=int, default=None, help="context per request: prompt + output (default 1024)")
    p.add_argument("--max-tokens", type=int, default=4096, help="most tokens a request may ask for (default 4096)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting or running before 429 (default 256)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body in KiB (default 1024)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections before 503 (default 512)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the model's, else ChatML)")
    p.add_argument("--prefill-buckets", default=None, metavar="N,N,...",
                   help="prompt lengths compiled at start (prompts are padded up; default powers of two)")
    p.add_argument("--no-emulate", action="store_true", help="run local devices as plain processes, without limits")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key folder (the workers' --keys)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="s without a heartbeat = device gone (5)")
    p.add_argument("--link-timeout", type=float, default=5.0, help="s an activation may sit on a link (5)")
    p.add_argument("--compute-timeout", type=float, default=30.0, help="s one window may compute (30; 0 = off)")
    p.add_argument("--no-recover", action="store_true", help="fail instead of re-planning when a device leaves")
    p.add_argument("--ready-file", metavar="FILE", help="write {url, port, pid} as JSON here once serving")
    p.set_defaults(func=run)


def _listen(addr: str) -> tuple[str, int]:
    a = addr[len("http://"):] if addr.startswith("http://") else addr
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SpecError(f"{addr!r} is not HOST:PORT", where="--listen", fix="e.g. --listen 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    if not args.cluster or not args.model:
        raise SpecError("--cluster and --model are required", where="primasim serve",
                        fix="e.g. primasim serve --cluster local --model llama-tiny --random-weights")
    host, port = _listen(args.listen)
    if not is_loopback(host) and not args.api_key and not args.insecure:
        raise SpecError(f"{host} is reachable from other machines and no API key is set", where="--listen",
                        fix="add --api-key KEY (clients send Authorization: Bearer KEY), or --insecure on a network "
                            "you trust")
    for flag, v in (("--slots", args.slots), ("--n-ctx", args.n_ctx), ("--max-tokens", args.max_tokens),
                    ("--max-queue", args.max_queue), ("--max-body-kb", args.max_body_kb),
                    ("--max-connections", args.max_connections)):
        if v is not None and v < 1:
            raise SpecError(f"{flag} must be >= 1, got {v}", where=flag, fix=f"give {flag} a positive value")
    for flag, t in (("--heartbeat-timeout", args.heartbeat_timeout), ("--link-timeout", args.link_timeout)):
        if not t > 0:
            raise SpecError(f"{flag} must be > 0 s", where=flag, fix=f"give {flag} a positive value")
    buckets: tuple[int, ...] = ()
    if args.prefill_buckets:
        try:
            buckets = tuple(int(x) for x in args.prefill_buckets.split(",") if x.strip())
        except ValueError:
            raise SpecError(f"{args.prefill_buckets!r} is not a list of integers", where="--prefill-buckets",
                            fix="e.g. --prefill-buckets 16,64,256") from None
        if not buckets or min(buckets) < 1:
            raise SpecError("prefill buckets must be positive", where="--prefill-buckets", fix="e.g. 16,64,256")
    template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as fh:
                template = fh.read()
        except OSError as exc:
            raise SpecError(f"cannot read the chat template ({exc.strerror})", where=args.chat_template,
                            fix="give a readable Jinja file") from None



    cluster = load_cluster(args.cluster)
    if args.random_weights:
        spec0 = load_model(args.model, args.quant)
        fmt = args.format or ("safetensors" if spec0.quant in ("f32", "f16") else "gguf")
        weights: Any = cached_random_weights(spec0, fmt=fmt)
        print(f"primasim serve: random weights {weights}", file=sys.stderr)
    else:
        weights = args.model
    ckpt = open_weights(weights)
    spec = ckpt.spec
    opts = parse_options(args.option, example="k=2")
    n_ctx = args.n_ctx or 1024
    if args.plan:
        plan = Plan.from_json(args.plan).replace(n_ctx=n_ctx)
    else:
        outcome = plan_for_runtime(args.system, spec, cluster, n_ctx, opts)
        if not outcome.feasible or outcome.plan is None:
            raise PlanError(f"{args.system} cannot serve {spec.name} on {cluster.name}: {outcome.reason}",
                            where="--system", fix="try another system, a smaller model or more devices")
        plan = outcome.plan
    tok = _tokenizer(ckpt)
    # bind before starting the workers: a port in use fails now, not after minutes of loading
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SpecError(f"cannot listen on {host}:{port} ({exc.strerror})", where="--listen",
                        fix="pick a free port and an address of this machine") from None
    run_opts = RunOptions(emulate=not args.no_emulate, keys=args.keys, heartbeat_timeout=args.heartbeat_timeout,
                          link_timeout=args.link_timeout, compute_timeout=args.compute_timeout, token_timeout=300.0)
    eopts = EngineOptions(slots=args.slots, n_ctx=n_ctx, recover=not args.no_recover, system=args.system,
                          plan_options=tuple(opts.items()), prefill_buckets=buckets, run=run_opts)
    engine = Engine(plan, ckpt, cluster, eopts)
    print(f"primasim serve: {spec.name} on {cluster.name}: {plan.describe()}, {engine.slots} slots, "
          f"context {n_ctx}; starting the workers...", file=sys.stderr, flush=True)
    try:
        engine.start()
        return _serve_http(args, engine, tok, template, sock, Limits(n_ctx=n_ctx, max_tokens=min(args.max_tokens, n_ctx),
                                                                     max_body_bytes=args.max_body_kb * 1024,
                                                                     max_queue=args.max_queue), spec)
    finally:
        engine.close()


def _serve_http(args: argparse.Namespace, engine: Any, tok: Any, template: str | None, sock: Any, limits: Any,
                spec: Any) -> int:


    model_id = args.model_name or spec.name
    served = Served(engine, tok, model_id, limits, api_key=args.api_key, chat_template=template,
                    aliases=(spec.name,))
    app = build_app(served)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    cfg = uvicorn.Config(app, log_level="warning", limit_concurrency=args.max_connections, timeout_keep_alive=30,
                         access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(cfg)
    print(f"primasim serve: {model_id} at {url} ({'API key required' if args.api_key else 'no API key'})",
          file=sys.stderr, flush=True)
    if args.ready_file:
        atomic_write_text(args.ready_file, json.dumps({"url": url, "port": port, "pid": os.getpid()}))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the handler it
    # found: make that an ordinary exit, so the engine stops the workers and the emulation is removed
    signal.signal(signal.SIGTERM, _exit_quietly)
    server.run(sockets=[sock])
    return 0


def _exit_quietly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def _tokenizer(ckpt: Any) -> Any:
    """The model's tokenizer (primasim.runtime.tokenizer), or None: then prompts must be token ids."""
    return load_tokenizer(ckpt.path)
