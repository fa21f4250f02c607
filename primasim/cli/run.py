"""`primasim run`: execute a plan on real (or emulated) devices and report what was measured."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from primasim.core.cluster import load_cluster
from primasim.core.errors import CheckpointError, PlanError, SpecError
from primasim.core.model_sources import load_model
from primasim.core.plan import Plan
from primasim.core.speculation import DEFAULT_DRAFT_TOKENS, AcceptanceLog, DraftSpec
from primasim.plan.draft import plan_speculative
from primasim.runtime.chat import chat_prompt_ids
from primasim.runtime.emulate import cleanup_stale
from primasim.runtime.head import RunOptions, cached_random_weights, open_weights, run_plan
from primasim.runtime.speculative import open_draft_ref
from primasim.runtime.tokenizer import load_tokenizer
from primasim.sim import make_plan

from . import HELP, speculation
from .options import add_option_arg, parse_options
from .output import console

DESCRIPTION = """Plan MODEL on CLUSTER (or take --plan), start one worker per device (in cgroups and network
namespaces when emulating, as root; `primasim worker` for devices with an address), generate tokens
and report the measured TPOT, TTFT, throughput and memory pressure."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help=HELP["run"],
        description=DESCRIPTION)
    p.add_argument("--cluster", help="built-in cluster name (e.g. home-emu, local) or a cluster TOML path")
    p.add_argument("--model", help="weights: a GGUF file or a directory with config.json + *.safetensors")
    p.add_argument("--random-weights", action="store_true",
                   help="MODEL is a catalogue name: generate random weights for it once into the cache directory "
                        "(<cache>/weights/) and run those")
    p.add_argument("--format", choices=("safetensors", "gguf"), default=None,
                   help="file format for --random-weights (default safetensors for f32/f16, gguf for quantised)")
    p.add_argument("--quant", help="--random-weights: f32, f16, q8_0, q4k (Q4_K_M; GGUF) ... (default: the catalogue's)")
    p.add_argument("--plan", metavar="FILE", help="plan JSON written by `primasim plan --json` (default: plan now)")
    p.add_argument("--system", default=None, help="system to plan for when there is no --plan (default prima)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (needs the model's tokenizer: tokenizer.json or the GGUF's vocabulary)")
    g.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, comma-separated, e.g. 1,5,9")
    p.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: format it with the model's chat template (tokenizer.chat_template "
                        "in the GGUF, chat_template in tokenizer_config.json)")
    p.add_argument("--chat-template", metavar="FILE", help="with --chat: a Jinja chat template to use instead")
    p.add_argument("--system-prompt", metavar="TEXT", help="with --chat: a system message before the user's")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --tokens instead of stopping at the model's end-of-generation tokens")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate per sequence (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--S", type=int, default=None, help="mdi-llm: sequences in flight (default: the plan's)")
    p.add_argument("--batch", type=int, default=None, help="bud: max requests decoded together (default: the plan's)")
    p.add_argument("--requests", type=int, default=None, help="bud: number of requests (default: --batch)")
    pf = p.add_mutually_exclusive_group()
    pf.add_argument("--prefetch", dest="prefetch", action="store_true", default=None, help="force prefetch on")
    pf.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="force prefetch off")
    p.add_argument("--residency", default="planned", choices=("planned", "lru"),
                   help="how a device short of memory holds its weights: planned (default: keep part of every layer, "
                        "stream the rest from disk, evicted after use) or lru (mmap + madvise WILLNEED of the next "
                        "window, the kernel's LRU decides, as prima.cpp)")
    p.add_argument("--n-ctx", type=int, default=None, help="context the KV cache is sized for (default: the plan's)")
    p.add_argument("--k", type=int, default=None, help="plan with this many laps (prima)")
    add_option_arg(p, "planner option (repeatable)")
    speculation.add_arguments(p, weights=True, acceptance=False)
    p.add_argument("--acceptance-log", metavar="FILE", default=None,
                   help="with --draft: write every pass's (drafted, accepted) as JSON, for `simulate --acceptance FILE`")
    p.add_argument("--no-emulate", action="store_true", help="run local devices as plain processes, without limits")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key folder (the workers' --keys)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before giving up (300)")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0, metavar="S",
                   help="a device that does not answer heartbeats this long (crashed, stopped, off the network) "
                        "ends the run, named (default 15 s)")
    p.add_argument("--link-timeout", type=float, default=60.0, metavar="S",
                   help="an activation on a ring link this long, its receiver idle, ends the run naming the link "
                        "(default 60 s)")
    p.add_argument("--compute-timeout", type=float, default=30.0, metavar="S",
                   help="a device computing one window this long (and >= 50x its median window) while it answers "
                        "heartbeats is hung: the run ends naming it (default 30 s; 0 = off)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the contract's keys + token_ids)")
    p.add_argument("--trace", metavar="FILE", help="write the measured timeline as a Chrome/Perfetto trace")
    p.add_argument("--save-trace", metavar="FILE", help="write the measured trace (primasim's Trace schema, JSON)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove leftovers of crashed emulated runs (cgroups, namespaces, links, workers) and exit")
    p.set_defaults(func=run)


def _prompt_ids(args: argparse.Namespace, ckpt: Any, vocab: int) -> tuple[list[int], Any]:
    tok = load_tokenizer(ckpt.path)
    if args.prompt_ids is not None:
        if args.chat:
            raise SpecError("--chat formats a text prompt", where="--chat", fix="use --prompt TEXT with --chat")
        try:
            ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise SpecError(f"not a comma-separated list of integers: {args.prompt_ids!r}", where="--prompt-ids",
                            fix="e.g. --prompt-ids 1,5,9") from None
        if not ids:
            raise SpecError("no token ids", where="--prompt-ids", fix="e.g. --prompt-ids 1,5,9")
    elif args.prompt is None:
        if args.chat:
            raise SpecError("--chat needs the user's message", where="--chat", fix='add --prompt "..."')
        # no prompt: the tokenizer's BOS if there is one, else token 1 (as llama.cpp's -p "")
        ids = [tok.bos_id if tok is not None and tok.bos_id is not None else 1]
    else:
        if tok is None:
            raise SpecError(f"{ckpt.path} has no tokenizer, so text cannot be encoded", where="--prompt",
                            fix="pass token ids with --prompt-ids 1,5,9, or add the model's tokenizer.json")
        if args.chat:
            template = None
            if args.chat_template:
                try:
                    template = Path(args.chat_template).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise SpecError(f"cannot read the template ({exc})", where=args.chat_template,
                                    fix="give a readable Jinja file") from None
            messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + \
                [{"role": "user", "content": args.prompt}]
            ids = chat_prompt_ids(tok, messages, template=template)
        else:
            ids = tok.encode(args.prompt)
        if not ids:
            raise SpecError("the prompt encodes to no tokens", where="--prompt", fix="give a non-empty prompt")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SpecError(f"token id(s) {bad[:5]} outside the vocabulary 0..{vocab - 1}",
                        where="--prompt-ids" if args.prompt_ids is not None else "--prompt",
                        fix="use ids below the model's vocabulary size")
    return ids, tok


def run(args: argparse.Namespace) -> int:
    if args.cleanup:

        removed = cleanup_stale()
        print("\n".join(removed) if removed else "nothing to clean up")
        return 0
    if not args.cluster or not args.model:
        raise SpecError("--cluster and --model are required", where="primasim run",
                        fix="e.g. primasim run --cluster home-emu --model llama-mini-300m --random-weights")
    for flag, v in (("--tokens", args.tokens), ("--S", args.S), ("--batch", args.batch), ("--requests", args.requests),
                    ("--n-ctx", args.n_ctx), ("--k", args.k)):
        if v is not None and v < 1:
            raise SpecError(f"{flag} must be >= 1, got {v}", where=flag, fix=f"give {flag} a positive value")
    for flag, t in (("--timeout", args.timeout), ("--heartbeat-timeout", args.heartbeat_timeout),
                    ("--link-timeout", args.link_timeout)):
        if not t > 0:
            raise SpecError(f"{flag} must be > 0 seconds, got {t}", where=flag, fix=f"give {flag} a positive value")
    if not args.compute_timeout >= 0:
        raise SpecError(f"--compute-timeout must be >= 0 seconds, got {args.compute_timeout}", where="--compute-timeout",
                        fix="give it a positive value, or 0 to turn the check off")
    if (args.chat_template or args.system_prompt) and not args.chat:
        raise SpecError("--chat-template and --system-prompt apply to --chat", where="--chat",
                        fix="add --chat (the prompt is then a user message)")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise SpecError("need temperature >= 0, 0 < top-p <= 1, top-k >= 0", where="sampling options",
                        fix="e.g. --temperature 0.8 --top-k 40 --top-p 0.95")

    cluster = load_cluster(args.cluster)
    if args.random_weights:
        spec0 = load_model(args.model, args.quant)
        fmt = args.format or ("safetensors" if spec0.quant in ("f32", "f16") else "gguf")
        if fmt == "safetensors" and spec0.quant not in ("f32", "f16"):
            raise SpecError(f"safetensors random weights are f32 or f16, not {spec0.quant}", where="--format",
                            fix="use --format gguf for quantised weights")
        try:
            weights = cached_random_weights(spec0, fmt=fmt)
        except CheckpointError as exc:
            raise SpecError(f"cannot write {spec0.quant} random weights: {exc.what}", where="--quant",
                            fix="use --quant f32, f16 or q8_0") from None
        if not args.json:
            print(f"random weights: {weights}", file=sys.stderr)
    else:
        weights = args.model
    ckpt = open_weights(weights)
    spec = ckpt.spec
    ids, tok = _prompt_ids(args, ckpt, spec.vocab)

    opts = parse_options(args.option)
    draft_path = None
    if args.draft is None:
        speculation.draft_spec(args, spec)  # flags that need --draft fail here
        if args.acceptance_log:
            raise SpecError("--acceptance-log needs a draft model", where="--acceptance-log", fix="add --draft MODEL")
    else:
        draft_path = open_draft_ref(args.draft, ckpt, seed=0)
        _, side = speculation.placement(args.draft_on)
        dev = (args.draft_on or "").partition(":")[0]
        if side == "gpu" or (dev and dev != cluster.head):
            raise SpecError("primasim's runtime runs the draft on the head's CPU (as prima.cpp, on the head)",
                            where="--draft-on", fix=f"drop --draft-on or use {cluster.head}:cpu")
    k = args.draft_tokens if args.draft_tokens is not None else DEFAULT_DRAFT_TOKENS
    if args.plan:
        plan = Plan.from_json(args.plan)
        if args.system and args.system != plan.system:
            raise SpecError(f"--system {args.system} differs from the plan's system {plan.system}", where="--system",
                            fix="drop --system when giving --plan")
        if args.n_ctx:
            plan = plan.replace(n_ctx=args.n_ctx)
    else:

        system = args.system or "prima"
        if args.k is not None:
            opts["k"] = args.k
        if args.S is not None and system == "mdi-llm":
            opts["S"] = args.S
        if args.batch is not None and system == "bud":
            opts["batch"] = args.batch
        if draft_path is not None:  # plan the target with the draft's memory taken from the head
            dspec = open_weights(draft_path).spec
            dp = plan_speculative(system, spec, cluster, DraftSpec(dspec, k, cluster.head, "cpu"),
                                  n_ctx=args.n_ctx or 1024, prompt_tokens=len(ids), ks=(k,), fixed_k=k,
                                  where_options=[(cluster.head, "cpu")], **opts)
            outcome = dp.outcome if dp.outcome is not None else make_plan(
                system, spec, cluster, n_ctx=args.n_ctx or 1024, prompt_tokens=len(ids), **opts)
        else:
            outcome = make_plan(system, spec, cluster, n_ctx=args.n_ctx or 1024, prompt_tokens=len(ids), **opts)
        if not outcome.feasible or outcome.plan is None:
            if args.json:
                out = outcome.to_json()
                out.update(measured=False, token_ids=[])
                print(json.dumps(out))
                return 0
            raise PlanError(f"{system} cannot run {spec.name} on {cluster.name}: {outcome.reason}",
                            where="--system", fix="try another system, a smaller model or more devices")
        plan = outcome.plan
    if args.prefetch is not None:
        plan = plan.replace(prefetch=args.prefetch)
    n_req = args.requests or args.batch
    options = RunOptions(max_new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, in_flight=args.S, n_requests=n_req,
                         emulate=not args.no_emulate, keys=args.keys, token_timeout=args.timeout,
                         heartbeat_timeout=args.heartbeat_timeout, link_timeout=args.link_timeout,
                         compute_timeout=args.compute_timeout, residency=args.residency,
                         stop_ids=() if tok is None or args.ignore_eos else tok.stop_ids(),
                         draft=None if draft_path is None else str(draft_path), draft_tokens=k)
    if plan.schedule == "batch" and args.batch is not None:
        plan = plan.replace(options={**plan.options, "batch": args.batch})

    # generated text continues the prompt (a text of its own after a lone BOS), streamed as soon as
    # each character is complete
    fresh = tok is not None and all(i == tok.bos_id for i in ids)
    stream = tok.stream(at_start=fresh) if tok is not None else None

    def on_token(t: dict[str, Any]) -> None:
        if not args.json and int(t.get("seq", 0)) == 0:
            text = stream.push(int(t["token_id"])) if stream is not None else f" {t['token_id']}"
            print(text, end="", flush=True)

    if not args.json:
        print(f"{plan.system}: {plan.describe()} ({plan.schedule}, weights {plan.weights}, "
              f"prefetch {'on' if plan.prefetch else 'off'})", file=sys.stderr)
        if tok is not None and args.prompt and not args.chat:
            print(args.prompt, end="", flush=True)
    res = run_plan(plan, ckpt, cluster, [ids], options, on_token=on_token)
    if stream is not None and not args.json:
        print(stream.flush(), end="")
    if args.trace:
        res.trace.save_chrome(args.trace)
    if args.save_trace:
        res.trace.save(args.save_trace)
    out = res.to_json()
    out.update(model=spec.name, quant=spec.quant, cluster=cluster.name, prompt_ids=ids)
    sp = res.trace.meta.get("speculation")
    if sp and args.acceptance_log:
        AcceptanceLog([(int(d), int(a)) for d, a in sp["pass_log"]],
                      {"target": spec.name, "draft": sp["draft"], "k": k, "temperature": args.temperature,
                       "prompt_ids": ids}).save(args.acceptance_log)
    if res.token_ids:
        last = res.token_ids[0][-1] if res.token_ids[0] else None
        out["finish_reason"] = "stop" if last in options.stop_ids else "length"
    if tok is not None and res.token_ids:
        out["text"] = tok.decode(res.token_ids[0], at_start=fresh)
    if args.json:
        print(json.dumps(out))
        return 0
    print()
    _print_human(out)
    return 0


def _print_human(out: dict[str, Any]) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} ms"

    con = console()
    tput = out.get("throughput_tok_s")
    con.print(f"measured: TPOT {ms(out['tpot_ms'])} (P50 {ms(out['tpot_p50_ms'])}, P90 {ms(out['tpot_p90_ms'])}), "
              f"TTFT {ms(out['ttft_ms'])}, throughput {tput:.2f} tok/s" if tput else "measured: no tokens")
    sp = out.get("speculation")
    if sp and sp.get("passes"):
        con.print(f"speculation: draft {sp['draft']}, K = {sp['k']}: {sp['tokens_per_pass']:.2f} tokens per pass over "
                  f"{sp['passes']} passes, alpha-hat {sp['alpha_hat']:.3f}, accepted drafts per pass "
                  f"{sp['accepted_hist']}")
    emu = out.get("emulation", {})
    t = Table(title="devices (measured)")
    for col in ("device", "mem pressure", "disk read MB", "major faults", "net tx KB", "cpu busy", "wait", "limits"):
        t.add_column(col)
    busy = out.get("busy", {})
    for d in (out.get("plan") or {}).get("devices", []):
        n = d["name"]
        if n not in out.get("disk_read_bytes", {}):
            continue
        lim = "; ".join(emu.get("devices", {}).get(n, {}).get("applied", [])) or "-"
        t.add_row(n, f"{100 * out['memory_pressure'].get(n, 0.0):.1f} %",
                  f"{out['disk_read_bytes'].get(n, 0.0) / 1e6:.1f}", f"{out.get('page_faults', {}).get(n, 0):.0f}",
                  f"{out['net_tx_bytes'].get(n, 0.0) / 1e3:.1f}", f"{100 * busy.get(n, {}).get('cpu', 0.0):.0f} %",
                  f"{100 * busy.get(n, {}).get('wait', 0.0):.0f} %", lim)
    con.print(t)
    for note in emu.get("limitations", []) + emu.get("notes", []):
        con.print(f"note: {note}")
