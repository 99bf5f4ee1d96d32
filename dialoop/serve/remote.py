"""Generation on another server: any OpenAI-compatible one (vLLM, SGLang, TGI, another `dialoop serve`).

`dialoop serve --inference-url URL [--inference-key KEY]` makes the web tier (chat, trainer suggestions, A/B
tests, /v1) send its generations there instead of loading a model. `RemoteBackend` has the worker's
interface (`submit` returning a `Generation`, `cancel`, `stats`, `metrics`): each generation is one
streamed request to the upstream's `/v1/chat/completions` (messages) or `/v1/completions` (a text prompt).
The upstream's refusals come back as the worker's (429 -> QueueFull with its Retry-After, 404 ->
UnknownModel, 400 -> ContextTooLong or ValueError), and cancelling a generation closes its upstream stream,
which cancels the generation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from dialoop.engine import SamplingParams
from dialoop.records import ChatMessage
from dialoop.serve.decoding import ChoiceEnd, Generation, TextDelta, TokenLogprob
from dialoop.serve.models import UnknownModel
from dialoop.serve.worker import ContextTooLong, QueueFull, WorkerStats

log = logging.getLogger(__name__)

# the engine's defaults are the API's defaults: only the fields that differ from them are sent
_DEFAULTS = SamplingParams()
_EXTRA_FIELDS = ("top_k", "min_p", "repetition_penalty")  # vLLM's names, which Dialoop's /v1 shares


class RemoteBackend:
    """The generation worker's interface over an OpenAI-compatible server's streaming API."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        max_queue: int = 64,
        max_batch: int = 16,
        default_max_tokens: int = 512,
        timeout_s: float = 600.0,
    ):
        """`base_url` is the server's root or its `/v1` URL."""
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else f"{url}/v1"
        self.api_key = api_key
        self.max_queue = max_queue  # generations in flight at once here; beyond it: QueueFull
        self.max_batch = max_batch  # choices per request (as the local worker's slots bound `n`)
        self.default_max_tokens = default_max_tokens
        self.timeout_s = timeout_s
        self.stats = WorkerStats()
        self._client: httpx.AsyncClient | None = None
        self._tasks: dict[str, tuple[Generation, asyncio.Task[None]]] = {}

    @property
    def running(self) -> bool:
        return self._client is not None

    @property
    def queued_rows(self) -> int:
        return 0  # the upstream queues

    async def start(self, *, preload: bool = True) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=self.max_queue + 8),
        )
        log.info("generating on %s", self.base_url)

    async def stop(self) -> None:
        for gen, _ in list(self._tasks.values()):
            gen.cancel()
        tasks = [task for _, task in self._tasks.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def metrics(self) -> dict[str, int]:
        return {
            "queue_depth": 0,
            "rows_running": sum(g.n for g, _ in self._tasks.values()),
            "kv_slots_total": 0,
            "kv_slots_used": 0,
            "tokens_generated_total": self.stats.tokens_generated,
            "requests_rejected_total": self.stats.rejected,
        }

    def cancel(self, generation_id: str) -> bool:
        found = self._tasks.get(generation_id)
        if found is None:
            return False
        found[0].cancel()
        return True

    async def submit(
        self,
        messages: list[ChatMessage] | None = None,
        *,
        text: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        model: str | None = None,
        n: int = 1,
        owner: str = "",
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        **sampling: Any,
    ) -> Generation:
        """Start a streamed generation upstream (see `GenerationWorker.submit`); its refusals are raised
        here, before any text, as the worker's exceptions."""
        if prompt_ids is not None:
            raise ValueError("a remote inference server takes text prompts, not token ids")
        if (messages is None) == (text is None):
            raise ValueError("give exactly one of messages and text")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be 1 to {self.max_batch}, got {n}")
        if self._client is None:
            raise RuntimeError("the remote backend is not running")
        if len(self._tasks) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{len(self._tasks)} generations in flight (limit {self.max_queue})", retry_after=1
            )
        budget = max_tokens or self.default_max_tokens
        params = [
            SamplingParams(
                max_tokens=budget,
                seed=None if seed is None else seed + i,
                stop=tuple(s for s in stop if s),
                **sampling,
            )
            for i in range(n)
        ]
        for p in params:
            p.validate()
        body = _request_body(params[0], n, seed, model or "default", owner)
        if messages is not None:
            path, body["messages"] = "/chat/completions", list(messages)
        else:
            path, body["prompt"] = "/completions", text
        request = self._client.build_request("POST", path, json=body)
        response = await self._client.send(request, stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            if response.status_code == 429:
                self.stats.rejected += 1
            raise _refusal(response)
        loop = asyncio.get_running_loop()
        gen = Generation(loop, model or "default", 0, params)
        task = asyncio.create_task(self._pump(gen, response, chat=messages is not None))
        self._tasks[gen.id] = (gen, task)

        def cancel() -> None:
            task.cancel()

        gen.on_cancel = cancel
        gen.on_finished = self._settle
        self.stats.submitted += 1
        return gen

    async def _pump(self, gen: Generation, response: httpx.Response, *, chat: bool) -> None:
        """Read the upstream's server-sent events into `gen` until `[DONE]`, an error or cancellation."""
        tokens = [0] * gen.n
        ends: dict[int, str] = {}
        usage: dict[str, Any] | None = None
        error: str | None = None
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = str(chunk["error"].get("message") or chunk["error"])
                    break
                gen.model = chunk.get("model") or gen.model
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    index = int(choice["index"])
                    content = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    logprobs = _logprobs(choice.get("logprobs"), chat)
                    if content or logprobs:
                        tokens[index] += len(logprobs) if logprobs else 1
                        gen.push(TextDelta(index, content or "", logprobs))
                    if choice.get("finish_reason"):
                        ends[index] = choice["finish_reason"]
        except asyncio.CancelledError:
            error = None
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("the upstream stream of generation %s failed: %s", gen.id, exc)
            error = f"the inference server's stream failed: {exc}"
        finally:
            await response.aclose()  # closing the stream cancels the generation upstream
            self._tasks.pop(gen.id, None)
        if usage is not None:
            gen.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            if gen.n == 1:
                tokens[0] = int(usage.get("completion_tokens") or tokens[0])
        self.stats.tokens_generated += sum(tokens)
        for i in range(gen.n):
            if i in ends:
                reason = ends[i] if ends[i] in ("stop", "length") else "stop"
                gen.push(ChoiceEnd(i, reason, tokens[i]))
            elif error is not None:
                gen.push(ChoiceEnd(i, "error", tokens[i], error))
            else:
                gen.push(ChoiceEnd(i, "cancelled", tokens[i]))

    def _settle(self, gen: Generation) -> None:
        reasons = {e.finish_reason for e in gen._ends.values()}
        if "error" in reasons:
            self.stats.failed += 1
        elif "cancelled" in reasons:
            self.stats.cancelled += 1
            self.stats.cancelled_ids.append(gen.id)
        else:
            self.stats.completed += 1


def _request_body(p: SamplingParams, n: int, seed: int | None, model: str, owner: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "n": n,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    if p.stop:
        body["stop"] = list(p.stop)
    if owner:
        body["user"] = owner
    for name in ("frequency_penalty", "presence_penalty", *_EXTRA_FIELDS):
        if getattr(p, name) != getattr(_DEFAULTS, name):
            body[name] = getattr(p, name)
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
    return body


def _logprobs(found: Any, chat: bool) -> tuple[TokenLogprob, ...]:
    """The upstream's logprobs of a chunk (chat or legacy shape) as the consumer's TokenLogprobs."""
    if not found:
        return ()
    if chat:
        return tuple(
            TokenLogprob(
                t["token"],
                float(t["logprob"]),
                tuple((a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or ()),
            )
            for t in found.get("content") or ()
        )
    tops = found.get("top_logprobs") or [None] * len(found.get("tokens") or ())
    return tuple(
        TokenLogprob(tok, float(lp), tuple((k, float(v)) for k, v in (top or {}).items()))
        for tok, lp, top in zip(
            found.get("tokens") or (), found.get("token_logprobs") or (), tops, strict=False
        )
    )


def _refusal(response: httpx.Response) -> Exception:
    """The worker's exception for an upstream's error answer."""
    message = response.text
    code = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = response.json()["error"]
        message, code = str(error.get("message") or message), error.get("code")
    message = f"the inference server refused: {message}"
    status = response.status_code
    if status == 429:
        retry = response.headers.get("retry-after", "1")
        return QueueFull(message, retry_after=int(retry) if retry.isdigit() else 1)
    if status == 404:
        return UnknownModel(message)
    if status == 413 or code == "context_length_exceeded":
        return ContextTooLong(message)
    if 400 <= status < 500:
        return ValueError(message)
    return RuntimeError(f"{message} (status {status})")
