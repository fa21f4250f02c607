"""Tensor parallelism as distributed-llama runs it (src/llm.cpp, reference D.3).

Every layer is sliced over the N nodes; each node computes its slice on its CPU, then the nodes
exchange partial results with an all-to-all over the network (each node sends its d-sized q80
buffer to every other node and waits for theirs) -- twice per layer, after the attention output
projection and after the FFN down projection. Per token the root first broadcasts the embedding;
at the end every node computes a vocabulary slice of the logits and sends it to the root, which
samples. Weights are pinned in RAM (no mmap offload): a slice that does not fit is an OOM, which
the plan validator reports before simulation. On Wi-Fi the N(N-1) messages of each all-reduce
queue for the one shared medium.
"""

from __future__ import annotations

import simpy

from ._context import SimContext, SimResult
from ._engine import Proc
from ._timing import kv_span

Q80_BYTES_PER_VALUE = 34 / 32  # dllama syncs in Q8_0 blocks


def _attn_fraction(ctx: SimContext) -> float:
    m = ctx.model
    attn = 2 * m.hidden * m.q_dim + 2 * m.hidden * m.n_kv_embd
    ffn = 3 * m.hidden * m.ffn
    return attn / (attn + ffn)


def run_tp(ctx: SimContext, entry: object) -> SimResult:
    assert ctx.plan is not None
    plan, m, cfg, env, net = ctx.plan, ctx.model, ctx.cfg, ctx.env, ctx.net
    names = [d.name for d in plan.active]
    root = names[0]
    N = len(names)
    ctx.setup_plan_memory(mmap=False)
    fa = _attn_fraction(ctx)

    def n_kv(filled: int) -> tuple[int, int]:
        return kv_span(cfg.kv_read, plan.n_ctx, filled)

    def node_phase(name: str, t: float, nbytes: float, label: str, token: int) -> Proc:
        dev = ctx.dev(name)
        yield from dev.cpu.serve(t, name=label, token=token)
        # its slice to every peer at once (TCP sends return when buffered: the messages queue for
        # airtime, their latencies overlap); the phase ends when every peer has every slice
        i = names.index(name)  # (each node starts with its successor: the flows spread over the ports)
        sends = [env.process(net.send(name, names[(i + j) % N], nbytes, name="all-reduce", token=token))
                 for j in range(1, N)]
        if sends:
            yield env.all_of(sends)

    def barrier(procs: list[simpy.Process]) -> Proc:
        yield env.all_of(procs)

    def walk(n_tokens: int, kv: tuple[int, int], token: int) -> Proc:
        sync = m.hidden * Q80_BYTES_PER_VALUE * n_tokens
        bcast = [env.process(net.send(root, p, m.hidden_bytes * n_tokens, name="embedding", token=token))
                 for p in names if p != root]
        yield from barrier(bcast)
        for layer in range(m.n_layers):
            for frac, label in ((fa, f"L{layer} attn"), (1.0 - fa, f"L{layer} ffn")):
                procs = [env.process(node_phase(n, ctx.dev(n).timing.layer("cpu", n_tokens, *kv) * frac / N,
                                                sync, label, token)) for n in names]
                yield from barrier(procs)
        logits = 4.0 * m.vocab / N  # the last token's logits only

        def out(n: str) -> Proc:
            dev = ctx.dev(n)
            yield from dev.cpu.serve(dev.timing.output(1) / N, name="output", token=token)
            if n != root:
                yield from net.send(n, root, logits, name="logits", token=token)

        yield from barrier([env.process(out(n)) for n in names])
        t_sample = cfg.sample_cost_per_vocab * m.vocab
        if t_sample > 0:
            yield from ctx.dev(root).cpu.serve(t_sample, name="sample", token=token)

    def main() -> Proc:
        P, T = cfg.prompt_tokens, cfg.tokens
        ctx.request(0, P, T)
        yield from walk(P, n_kv(P), 0)
        ctx.emit(0, 0)
        for i in range(1, T):
            yield from walk(1, n_kv(P + i), i)
            ctx.emit(0, i)

    done = env.process(main())
    ctx.run(until=done)
    return ctx.result(extra={"all_reduces_per_token": 2 * m.n_layers})
