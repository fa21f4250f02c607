"""`primasim validate`: profile -> plan -> simulate -> run -> compare, on an emulated cluster."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from primasim.core.errors import SpecError
from primasim.loop.validate import ValidateConfig, default_out, validate
from primasim.runtime.emulate import is_root

from . import HELP
from .options import add_option_arg, parse_options
from .output import console

DESCRIPTION = """On embedded defaults: random weights for llama-mini-300m (generated once, cached), the emulated
four-device cluster home-emu (memory-short devices, shaped links). Profiles each device inside its
limits, plans with Halda, simulates the plan as the runtime executes it, runs it, and prints
predicted vs measured TPOT, TTFT, throughput and per-device disk and memory; writes a figure, both
timelines (Chrome traces) and a JSON summary into --out. Without root it runs degraded (plain
processes, no limits) and says so."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help=HELP["validate"],
        description=DESCRIPTION)
    p.add_argument("--out", metavar="DIR", default="", help="output directory (default runs/validate-<time>)")
    p.add_argument("--cluster", default="home-emu", help="emulated cluster: built-in name or TOML (default home-emu)")
    p.add_argument("--model", default="llama-mini-300m", help="catalogue model, run on random weights "
                   "(default llama-mini-300m, 1.24 GB at f32)")
    p.add_argument("--quant", default="q4k", help="weights of the random checkpoint: q4k (Q4_K_M GGUF, the papers' "
                   "format; default), f32, f16, or another GGUF quantisation such as q8_0")
    p.add_argument("--memory-scale", type=float, default=0.0, metavar="X",
                   help="multiply every device's memory for weights (beyond its KV caches and activation reserve) by X "
                        "(default: the weight file's size over the f32 model's, so a quantised model streams on the "
                        "same devices as the f32 one)")
    p.add_argument("--residency", default="planned", choices=("planned", "lru"),
                   help="how a device short of memory holds its weights, in the run and the simulation: planned (keep "
                        "part of every layer, stream the rest) or lru (mmap + prefetch, the kernel decides; prima.cpp)")
    p.add_argument("--system", default="prima", help="planner (default prima: Halda)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--n-ctx", type=int, default=1024, help="KV cache length (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="prompt and jitter seed (default 0)")
    add_option_arg(p, "planner option (repeatable)")
    p.add_argument("--no-emulate", action="store_true", help="plain processes without limits (what non-root gets)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before a run gives up")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of tables")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", metavar="MODEL", default="",
                   help="draft model, run on the head: first:N (the random-weight target's first N blocks) or a "
                        "checkpoint with the target's vocabulary")
    g.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens drafted per ring pass (default 4)")
    g.add_argument("--acceptance", default="", metavar="A",
                   help="the prediction's acceptance model: a rate (0.7), rates per position (0.9,0.8) or an "
                        "acceptance log (`primasim run --acceptance-log`); default: measured by a separate run of the "
                        "runtime's speculative loop on the prompt, written to acceptance.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = list(parse_options(args.option, example="k=2").items())
    for flag, v in (("--tokens", args.tokens), ("--prompt-tokens", args.prompt_tokens), ("--n-ctx", args.n_ctx)):
        if v < 1:
            raise SpecError(f"{flag} must be >= 1, got {v}", where=flag, fix=f"give {flag} a positive value")
    if args.prompt_tokens + args.tokens > args.n_ctx:
        raise SpecError(f"prompt + tokens ({args.prompt_tokens + args.tokens}) exceed --n-ctx {args.n_ctx}",
                        where="--tokens", fix="generate fewer tokens or raise --n-ctx")
    if not args.draft and (args.acceptance or args.draft_tokens != 4):
        raise SpecError("--draft-tokens and --acceptance need a draft model", where="--draft-tokens",
                        fix="add --draft first:2 (or a draft checkpoint)")
    if args.draft and args.draft_tokens < 1:
        raise SpecError(f"--draft-tokens must be >= 1, got {args.draft_tokens}", where="--draft-tokens",
                        fix="e.g. --draft-tokens 4")
    out = args.out or str(default_out())
    cfg = ValidateConfig(cluster=args.cluster, model=args.model, quant=args.quant, system=args.system,
                         tokens=args.tokens, prompt_tokens=args.prompt_tokens, n_ctx=args.n_ctx, seed=args.seed,
                         emulate=not args.no_emulate, plan_options=tuple(opts), out=out, timeout=args.timeout,
                         residency=args.residency, memory_scale=args.memory_scale, draft=args.draft,
                         draft_tokens=args.draft_tokens, acceptance=args.acceptance)
    if args.json:
        res = validate(cfg)
        print(json.dumps(res.summary(), default=str))
        return 0

    con = console(stderr=True)

    if not args.no_emulate and not is_root():
        con.print("[yellow]not root: running degraded -- the devices are plain processes without memory, CPU, "
                  "disk or link limits (profiled, planned, simulated, run and compared all the same)[/]")
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=con,
                  transient=False) as prog:
        task = prog.add_task("starting", total=1.0)

        def progress(msg: str, frac: float) -> None:
            prog.update(task, description=msg, completed=frac)

        res = validate(cfg, progress)
    print_report(res)
    return 0


def print_report(res: Any) -> None:
    con = console()
    plan = res.plan
    con.print(f"[bold]{res.config.model}[/] on [bold]{res.profile.cluster.name}[/]"
              f"{' (degraded: no limits)' if res.degraded else ''}: {plan.system} plan {plan.describe()}, "
              f"prefetch {'on' if plan.prefetch else 'off'}")
    dev = Table(title="profiled devices (inside their limits)")
    for c in ("device", "RAM for the model", "eff. RAM bw", "eff. GFLOPS", "call", "disk", "layers",
              "residency"):
        dev.add_column(c)
    resid = res.predicted.extra.get("residency", {})
    layers = plan.totals()
    for d in res.profile.cluster.devices:
        r = resid.get(d.name, {})
        mode = r.get("mode", "-")
        if mode == "planned":
            mode = f"streams {100 * (1 - r['keep_fraction']):.0f} % of each layer"
        elif mode == "lru":
            mode = "more than fits: the page cache decides" + (", prefetch" if r.get("window_prefetch") else "")
        dev.add_row(d.name, f"{d.ram_avail / 2**20:.0f} MiB", f"{d.ram_bw / 1e9:.1f} GB/s",
                    f"{d.cpu_flops['f32'] / 1e9:.1f}", f"{d.call_overhead * 1e3:.2f} ms", f"{d.disk_seq / 1e6:.0f} MB/s",
                    str(layers.get(d.name, (0, 0))[0]), mode)
    con.print(dev)
    t = Table(title="predicted vs measured")
    for c in ("metric", "device", "predicted", "measured", "error"):
        t.add_column(c, justify="right" if c in ("predicted", "measured", "error") else "left")
    for r in res.rows:
        j = r.to_json()
        err, pp = j["error_pct"], j["error_pp"]
        style = "green" if abs(err) <= 5 else "yellow" if abs(err) <= 10 else "red"
        es = f"{pp:+.1f} pp" if pp == pp else "-" if err != err else f"[{style}]{err:+.1f} %[/]"
        t.add_row(j["metric"], j["device"], f"{j['predicted']:.4g} {j['unit']}", f"{j['measured']:.4g} {j['unit']}",
                  es)
    con.print(t)
    for n in res.notes + res.profile.limitations:
        con.print(f"note: {n}")
    s = res.seconds
    con.print(f"took {sum(s.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) + ")")
    con.print(f"wrote {res.out}/: summary.json, comparison.csv, validate.png, predicted.trace.json, "
              "measured.trace.json (open in ui.perfetto.dev), cluster-profiled.toml, probes.json, plan.json")
    sys.stdout.flush()
