"""The HTTP side of `minillm serve`: routes, the API key, the body limit, server-sent events and
clients that go away.

Built on Starlette (routing, requests, streaming responses) and served by uvicorn: both are
small, widely used and kept up to date, they parse HTTP so that minillm does not, and Starlette
tells a streaming response when its client disconnects, which frees the slot at once.

The event loop never computes: a prompt is rendered and tokenized on a worker thread, and the
model runs on the engine's own thread, whose events come back through the loop's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import MiniLLMError
from . import protocol
from .engine import Busy, Closed, Done, Engine, Failed, Piece
from .prompts import Prompts
from .protocol import ApiError, Reply

log = logging.getLogger("minillm.server")
DISCARD_FACTOR = 4  # a body over the limit is read (and dropped) up to this many times it


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None
    max_body_bytes: int
    default_max_tokens: int  # for a chat request that names none
    fingerprint: str


class _Channel:
    """A job's events, from the engine's thread into this request's coroutine."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def pending(self) -> list:
        """The events already queued (without waiting)."""
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


def _error(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _api_errors(endpoint):
    """Refusals as OpenAI error objects; an unexpected failure is one line in the log and a
    500, never a traceback, and never disturbs another request."""
    @functools.wraps(endpoint)
    async def wrapper(self, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except ApiError as err:
            return _error(err)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=400)
        except Exception as err:
            log.error("internal error on %s: %s: %s", request.url.path, type(err).__name__, err)
            return _error(ApiError(500, f"internal error: {type(err).__name__}",
                                   "server_error"))
    return wrapper


class Api:
    def __init__(self, engine: Engine, prompts: Prompts, settings: Settings):
        self.engine, self.prompts, self.settings = engine, prompts, settings
        self.created = int(time.time())

    # -- checks ------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            what = "no API key was given" if not given else "the API key is not valid"
            raise ApiError(401, f"{what}: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        """The JSON body, read up to the limit; a larger one is read on (and dropped) for a
        while, so that the client can read the 413 instead of a reset connection."""
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than the limit of {limit:,} "
                                  "bytes (minillm serve --max-body-mb)",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DISCARD_FACTOR * limit:
            raise too_large
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > DISCARD_FACTOR * limit:
                break
        if size > limit:
            raise too_large
        return protocol.parse_json(bytes(body))

    # -- endpoints ---------------------------------------------------------------------------
    @_api_errors
    async def health(self, request: Request) -> Response:
        status = self.engine.status()
        busy = sum(s["state"] != "idle" for s in status["slots"])
        body = {"status": "shutting_down" if status["closing"] else "ok",
                "slots_idle": len(status["slots"]) - busy, "slots_busy": busy,
                "queued": status["queued"]}
        return JSONResponse(body, status_code=503 if status["closing"] else 200)

    @_api_errors
    async def slots(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self.engine.status())

    def _model(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "minillm"}

    @_api_errors
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model()]})

    @_api_errors
    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["name"]
        if name != self.settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves "
                                f"{self.settings.model_name!r}", param="model",
                           code="model_not_found")
        return JSONResponse(self._model())

    @_api_errors
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        spec = protocol.parse_chat(body, self.settings.default_max_tokens)
        prompt = await self._prompt(self.prompts.chat, spec.messages)
        return await self._generate(request, spec, prompt, self.prompts.chat_stop_ids,
                                    spec.stop + self.prompts.chat_stop_texts)

    @_api_errors
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        spec = protocol.parse_completion(body)
        prompt = await self._prompt(self.prompts.completion, spec.prompt)
        return await self._generate(request, spec, prompt, self.prompts.text_stop_ids, spec.stop)

    @staticmethod
    async def _prompt(build, what):
        """Render and tokenize on a worker thread: a long conversation takes a while."""
        try:
            return await run_in_threadpool(build, what)
        except MiniLLMError as err:  # the chat template refused the conversation
            raise ApiError(400, str(err), param="messages", code="invalid_value") from None

    async def _generate(self, request: Request, spec: protocol.Generate, prompt, stop_ids,
                        stop_texts) -> Response:
        channel = _Channel()
        stop_ids = frozenset() if spec.ignore_eos else stop_ids
        try:
            job = self.engine.submit(prompt, spec.params, stop_ids, stop_texts, channel.emit)
        except Busy as err:
            raise ApiError(503, str(err), "server_error", code="server_busy") from None
        except Closed as err:
            raise ApiError(503, str(err), "server_error", code="shutting_down") from None
        reply = Reply.new(spec.kind, self.settings.model_name, self.settings.fingerprint)
        if spec.stream:
            return StreamingResponse(self._events(job, channel, reply, spec.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await self._answer(request, job, channel, reply)

    async def _answer(self, request: Request, job, channel: _Channel, reply: Reply) -> Response:
        """The whole answer as one response; a client that disconnects meanwhile cancels it."""
        collect = asyncio.ensure_future(_collect(channel))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                job.cancel()
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody is there to read it
        text, end = collect.result()
        if isinstance(end, Failed):
            raise ApiError(end.status, end.message, "server_error")
        return JSONResponse(reply.response(text, end.finish_reason, end.prompt_tokens,
                                           end.completion_tokens))

    async def _events(self, job, channel: _Channel, reply: Reply, include_usage: bool):
        """Server-sent events: a chunk per piece of text (pieces that queued up meanwhile go
        together), the finish reason, the usage when asked, then [DONE]. If the client goes
        away, Starlette cancels this generator and the job is cancelled with it."""
        try:
            if reply.kind == "chat":
                yield _sse(reply.chunk("", role=True))
            while True:
                events = [await channel.queue.get()] + channel.pending()
                text = "".join(e.text for e in events if isinstance(e, Piece))
                if text:
                    yield _sse(reply.chunk(text))
                end = events[-1]
                if isinstance(end, Failed):
                    yield _sse(ApiError(end.status, end.message, "server_error").body())
                    return
                if isinstance(end, Done):
                    yield _sse(reply.chunk(None if reply.kind == "chat" else "",
                                           end.finish_reason))
                    if include_usage:
                        yield _sse(reply.usage_chunk(end.prompt_tokens, end.completion_tokens))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # a no-op once the job is done


async def _collect(channel: _Channel):
    """(the answer's text, its last event: Done or Failed)."""
    pieces = []
    while True:
        event = await channel.queue.get()
        if isinstance(event, Piece):
            pieces.append(event.text)
        else:
            return "".join(pieces), event


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _not_found(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = (f"{request.method} {request.url.path} is not an endpoint of this server"
               if exc.status_code in (404, 405) else str(exc.detail))
    return _error(ApiError(exc.status_code, message, code=code))


def create_app(engine: Engine, prompts: Prompts, settings: Settings) -> Starlette:
    api = Api(engine, prompts, settings)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/slots", api.slots, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
