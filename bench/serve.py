#!/usr/bin/env python
"""The server (`vffn-serve`'s engine behind its HTTP API) against the batched generate path, side by side.

One in-process server with --slots slots (default 32, as a deployment would run it) over one device, clients on
loopback speaking HTTP (aiohttp, non-streaming completions, EOS ignored so every request runs its budget):

  tokens/s     with C concurrent clients (default 1, 8, 32), each sending --requests requests in turn of
               --prompt-len random tokens and --new-tokens new ones; wall time from the first request to the
               last answer (prefill, queueing and HTTP included)
  generate     `infer.decode.generate` (bench/decode.py's path) on a batch of C such prompts: end to end
               (prefill + decode loop) and the decode loop alone; ratio = server / generate end to end
  TTFT         time to the first streamed token of one request arriving while C-1 others decode, and alone
  loops        FFN loops per token and layer the server's decode steps executed on the rows in use (the
               compaction's padding rows included), with the free slots' single loop charged too, against the
               tokens' own mean depth (the ideal): from the engine's /metrics counters

Weights: a fresh initialisation of --config (random routers: near-uniform depths), or --run DIR (a trained run).
Every configuration runs once first (compiles), then --rounds rounds; medians are reported.

Examples:
  python bench/serve.py
  python bench/serve.py --run runs/tiny --clients 1,8,32 --new-tokens 64 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_served(args):
    import jax

    from vffn_jax import config as config_lib
    from vffn_jax.data.tokenizer import load_tokenizer
    from vffn_jax.model import kv_cache, placement
    from vffn_jax.parallel import sharding as shd
    from vffn_jax.serve.served import Served

    device = jax.devices()[:1]
    if args.run:
        from vffn_jax.checkpoint import restore

        run = restore.restore_params(args.run, devices=device)
        cfg, params, mesh, name = run.cfg, run.params, run.setup.mesh, f"{args.run} step {run.step}"
    else:
        cfg = config_lib.load_config(args.config, "versatile", config_lib.parse_set_args(args.overrides))
        mesh = shd.make_mesh(config_lib.MeshConfig(data=1), device)
        _, params, _ = placement.init_params(cfg.model, mesh, cfg.train.seed)
        name = f"fresh {args.config}/versatile"
    tok = load_tokenizer(cfg.data.tokenizer)
    return Served("bench", cfg.model, kv_cache.pure_params(params), tok, cfg.train.seq_len, mesh, name, 0), device


async def _clients(url, prompts_per_client, new_tokens):
    import aiohttp

    async def client(session, prompts):
        n = 0
        for p in prompts:
            body = {"prompt": p, "max_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as r:
                n += (await r.json())["usage"]["completion_tokens"]
        return n

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(client(session, ps) for ps in prompts_per_client))
        return sum(counts), time.perf_counter() - t0


async def _ttft(url, prompt, background, new_tokens):
    """Seconds to the first streamed chunk of one request sent once `background` requests are decoding."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def long(p):
            body = {"prompt": p, "max_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as r:
                await r.read()

        tasks = [asyncio.create_task(long(p)) for p in background]
        while background:  # wait until they are all in slots
            async with session.get(url + "/health") as r:
                if (await r.json())["slots_in_use"] >= len(background):
                    break
            await asyncio.sleep(0.005)
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 1.0, "ignore_eos": True, "stream": True}
        t0 = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    dt = time.perf_counter() - t0
                    break
            await r.read()
        await asyncio.gather(*tasks)
        return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="scale preset of the fresh model (default tiny)")
    p.add_argument("--run", default=None, metavar="DIR", help="serve a trained run instead")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrent clients (default 1,8,32)")
    p.add_argument("--slots", type=int, default=None, help="server slots (default: the most clients)")
    p.add_argument("--steps-per-call", type=int, default=8, help="decode steps per device call (default 8, as "
                   "vffn-serve's)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per round (default 2)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from vffn_jax.infer import decode, sampling
    from vffn_jax.serve.app import AppOptions
    from vffn_jax.serve.engine import Engine
    from vffn_jax.serve.server import ServerThread

    clients = [int(c) for c in args.clients.split(",")]
    served, device = build_served(args)
    engine = Engine(served, args.slots or max(clients), steps_per_call=args.steps_per_call).start()
    server = ServerThread(engine, served, AppOptions(max_tokens_default=args.new_tokens)).start()
    rng = np.random.default_rng(0)

    def prompts(n):
        return [rng.integers(0, 256, args.prompt_len).tolist() for _ in range(n)]

    def serve_once(c):
        before = engine.metrics.snapshot()
        n, dt = asyncio.run(_clients(server.url, [prompts(args.requests) for _ in range(c)], args.new_tokens))
        after = engine.metrics.snapshot()
        d = {k: after[k] - before[k] for k in ("loops_executed", "loops_free_slots", "token_depth", "token_layers")}
        return n / dt, d

    def generate_once(c):
        gens, st = decode.generate(served.m, served.params, prompts(c), max_new_tokens=args.new_tokens,
                                   context=served.context, sampling_cfg=sampling.SamplingConfig(1.0),
                                   seed=int(rng.integers(1 << 30)), eos_id=None, valid_vocab=served.valid_vocab)
        n = sum(len(g.ids) for g in gens)
        return n / (st.prefill_s + st.decode_s), st.decode_tokens / st.decode_s

    for c in clients:  # compile and warm up
        serve_once(c)
        generate_once(c)
    gc.freeze()  # as vffn-serve does once warm: the collector's full passes skip the long-lived heap
    res = {c: {"serve": [], "gen": [], "gen_loop": [], "loops": []} for c in clients}
    for _ in range(args.rounds):
        for c in clients:
            tps, d = serve_once(c)
            res[c]["serve"].append(tps)
            res[c]["loops"].append(d)
            g, gl = generate_once(c)
            res[c]["gen"].append(g)
            res[c]["gen_loop"].append(gl)
    busy = max(clients) - 1
    asyncio.run(_ttft(server.url, prompts(1)[0], [], args.new_tokens))  # warm the streaming path
    ttft_idle = statistics.median(asyncio.run(_ttft(server.url, prompts(1)[0], [], args.new_tokens))
                                  for _ in range(args.rounds))
    ttft_busy = statistics.median(asyncio.run(_ttft(server.url, prompts(1)[0], prompts(busy), 4 * args.new_tokens
                                                    if args.prompt_len + 4 * args.new_tokens <= served.context
                                                    else served.context - args.prompt_len))
                                  for _ in range(args.rounds))
    server.drain(10)

    m = served.m
    print(f"serve vs generate on {device[0].device_kind} ({jax.default_backend()}), {served.workdir}: "
          f"d_model={m.d_model} layers={m.n_layers} d_ff={m.d_ff} context={served.context}; {engine.slots} slots, "
          f"{args.steps_per_call} decode steps per call; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens/request, {args.requests} requests/client; "
          f"median of {args.rounds} rounds")
    print()
    print("| clients | serve tok/s | generate tok/s (end to end) | generate tok/s (decode loop) | serve / generate "
          "| exec loops/token (in use) | exec loops/token (all slots) | own depth | exec / own |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in clients:
        r = res[c]
        s, g, gl = (statistics.median(r[k]) for k in ("serve", "gen", "gen_loop"))
        tot = {k: sum(d[k] for d in r["loops"]) for k in r["loops"][0]}
        per = max(tot["token_layers"], 1)
        in_use = (tot["loops_executed"] - tot["loops_free_slots"]) / per
        own = tot["token_depth"] / per
        print(f"| {c} | {s:,.0f} | {g:,.0f} | {gl:,.0f} | {s / g:.2f} | {in_use:.2f} | "
              f"{tot['loops_executed'] / per:.2f} | {own:.2f} | {in_use / own:.2f} |")
    print()
    print(f"time to first token: {1e3 * ttft_idle:.1f} ms alone, {1e3 * ttft_busy:.1f} ms arriving while {busy} "
          "others decode")
    print("targets: serve / generate >= 0.8 at 32 clients; exec / own <= 1.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
