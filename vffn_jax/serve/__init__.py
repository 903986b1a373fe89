"""Serving a restored run over an OpenAI-compatible HTTP API with continuous batching (`vffn-serve`).

served.py     the run loaded for serving (params, tokenizer, context, model id, chat template)
rows.py       per-row sampling: every slot has its own temperature, top-k, top-p and seed
programs.py   the jitted device programs: prefill into slots, K decode steps over a bucket of slots
textout.py    detokenising one request's tokens: stop strings, held-back text, logprob records
request.py    what the engine is asked (Request) and answers (Event), and the Handle that cancels it
generation.py one request being generated: the tokens sampled for it become its events; where it ends
engine.py     slots over one persistent KV cache, admitted and freed between decode steps (its own thread)
metrics.py    counters and the Prometheus text of /metrics
protocol.py   request bodies parsed and checked into engine requests; OpenAI-style errors
app.py        the aiohttp routes
server.py     the aiohttp server on its own event-loop thread (tests, the command line), draining on stop
"""
