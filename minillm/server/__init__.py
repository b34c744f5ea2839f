"""`minillm serve`: an OpenAI-compatible HTTP server whose conversations never overflow.

engine.py   the slots and the worker thread that decodes them together (minillm.batch)
protocol.py the OpenAI requests (checked field by field) and responses
prompts.py  chat template and tokenizer: what a request asks the model to continue
app.py      the HTTP side (Starlette): routes, API key, body limit, server-sent events
runner.py   uvicorn, and the shutdown on SIGINT/SIGTERM

engine, protocol and prompts need only minillm; app and runner need the `serve` extra.
"""
