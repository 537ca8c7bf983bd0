"""The OpenAI-compatible server: chat and text completions (streaming or not), metrics, web chat.

    tandem serve --model runs/demo                 # then open http://127.0.0.1:8000/
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 12 + 7?"}]}'

    app = create_app(lambda: load_model("runs/demo"), ServeConfig(name="demo"))   # any ASGI server
    uvicorn_server(app, shutdown_timeout=10, port=8000).run()       # Ctrl-C and SIGTERM drain

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET / (the chat page in web/), GET /openapi.json. Beyond
OpenAI's parameters: top_k and ignore_eos (as vLLM). Errors are OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}}: 400 bad body / parameter / model name / prompt
longer than the context, 401 a /v1/ request without a configured API key (ServeConfig.api_keys;
code invalid_api_key), 404/405 wrong route, 413 body over max_body_bytes, 429 full, 503 while
the model loads or the server stops (requests still running when a shutdown's grace period ends
get it too, as JSON or as a stream's error event before `data: [DONE]`: see drain), 500 only if
generation itself fails or an engine fault could not be recovered (code engine_fault). /health
answers {"status": ...}: ok or degraded (an engine is being rebuilt after a fault) with 200;
loading, draining or failed with 503 and the error.

How a request flows. The handler (asyncio) validates the body, renders the ChatML prompt, and
turns each of the `n` choices into a `Job`. ONE background thread owns the engine: it takes jobs
and cancellations from a thread-safe inbox between decode steps, runs `engine.step()` while there
is work, and hands every step's new tokens back to the event loop in one `call_soon_threadsafe`,
which appends them to each request's inbox and wakes its handler once. The handler takes all
that has arrived: each choice detokenizes incrementally (`TextStream`: multi-byte characters split
across BPE tokens come out whole), checks stop strings on the decoded text, and, for chat, routes
the text through `ReasoningSplitter`; a stream then writes one chunk per choice (per run of
reasoning or content: a delta carries one of the two), so tokens that piled up while the handler
was behind (the engine thread and the event loop share one GIL) go out coalesced; usage and
logprobs still count every token. A client that disconnects cancels its jobs, which frees their
cache slots before the next step. Admission is bounded: at most max_batch running + max_queue
waiting sequences (an n=4 request counts 4); beyond that the answer is an immediate 429.

Reasoning (DeepSeek's convention). Chat replies carry the model's thinking separately: text
inside <think>…</think> goes to `reasoning_content`, everything else to `content`; the four tags
<think> </think> <answer> </answer> are dropped, and the blank space next to each tag is trimmed
(so "<think>\\nA\\n</think>\\n<answer>19</answer>" gives reasoning "A", content "19"). The
streamed deltas concatenate to exactly the non-streamed message. Text completions are raw text
with the tags in place. Assistant turns sent back in `messages` are used verbatim as history.

Counting. usage.completion_tokens counts every token the model generated, the closing
<|im_end|> included (it is a sampled token; so is a token that completed a stop string); chat
logprobs list the same tokens, so len(logprobs.content) == completion_tokens. Logprobs are the
engine's: log-softmax of the raw logits (temperature 1, before top-k/top-p), not of the
distribution actually sampled from. With `n` > 1 and a seed, choice i uses seed + i.

Engine faults (recovery.py). A step that raises, yields non-finite logits or outlasts
--step-timeout is a fault: the engine is rebuilt and the requests it held restart from their
prompt with their seeds, the tokens a client already has are swallowed as they are replayed, so
a client sees the fault-free answer, only later; past --request-restarts a request ends with a
500 engine_fault (JSON, or a stream's error event). --fault and --fault-mtbf inject them.

Simplifications, stated: Unsupported parameters that would change the output
(penalties, logit_bias, tools, echo, suffix) are refused with 400 rather than ignored; other
unknown fields are ignored. One model per server.

The modules: protocol (request bodies, OpenAI's error shape), text (detokenizing, stop strings,
the reasoning split), loop (the engine thread, graceful stop), recovery (engine faults), run (one request: its choices,
JSON or server-sent events), metrics (Prometheus), app (create_app: loading, routes, limits).
"""

from tandem.infer.server.app import ServeConfig, ServerState, create_app
from tandem.infer.server.loop import EngineLoop, drain, uvicorn_server
from tandem.infer.server.protocol import APIError, ChatRequest, CompletionRequest, error_body
from tandem.infer.server.text import ReasoningSplitter, TextStream, split_reasoning

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "EngineLoop", "ReasoningSplitter", "ServeConfig",
           "ServerState", "TextStream", "create_app", "drain", "error_body", "split_reasoning", "uvicorn_server"]
