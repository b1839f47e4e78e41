"""`openai:MODEL[@BASE_URL]` — any OpenAI-compatible chat endpoint as a VQA model.

GPT-4o (`openai:gpt-4o`, key from `OPENAI_API_KEY`), or a local vLLM / SGLang server
(`openai:llava-hf/llava-1.5-7b-hf@http://127.0.0.1:8000/v1`). Options after commas:

    api_key_env=NAME     environment variable holding the key (default OPENAI_API_KEY; alias key_env)
    max_concurrency=N    requests in flight at once (default 8; alias concurrency)
    timeout=SECONDS      per-request timeout (default 60)
    max_retries=N        retries on 429/5xx/timeouts (default 5)
    backoff=SECONDS      first retry delay, doubling up to backoff_max=SECONDS (default 1 and 30)
    image_detail=auto|low|high   the `detail` of the image part (default: not sent)
    token_param=max_tokens|max_completion_tokens   how the answer length is sent (default max_tokens)
    cache=PATH           a response cache (SQLite) for deterministic requests; off by default,
                         `medvqa eval` already resumes from its own predictions file

The image goes out as a base64 data URL. The key is never part of the fingerprint, a log, or a file.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from medvqa.errors import BadInput
from medvqa.openai_support import (
    DEFAULT_API_KEY_ENV,
    ChatClient,
    EndpointError,
    image_data_url,
    map_bounded,
)
from medvqa.registry import models
from medvqa.safety import image_sha256
from medvqa.types import GenerationRequest, GenerationSettings, Prompt, stable_hash

IMAGE_PLACEHOLDER = "<image>"
_ALIASES = {"key_env": "api_key_env", "concurrency": "max_concurrency", "backoff_initial": "backoff"}


def split_target(target: str) -> tuple[str, str | None]:
    """`"MODEL@http://host:8000/v1"` → `("MODEL", "http://host:8000/v1")`; no `@` → no base URL."""
    model, sep, base_url = target.partition("@")
    model = model.strip()
    if not model:
        raise BadInput(
            f"model spec target {target!r} names no model (openai:MODEL[@BASE_URL])", field="--model"
        )
    return model, (base_url.strip() or None) if sep else None


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadInput(
            f"openai model option {name}={value!r} is not a {kind.__name__}", field="--model"
        ) from None


@models.register("openai")
class OpenAIModel:
    """An OpenAI-compatible chat endpoint (GPT-4o, vLLM, SGLang) answering (image, prompt) pairs."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        spec: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        max_concurrency: int | str = 8,
        timeout: float | str = 60.0,
        max_retries: int | str = 5,
        backoff: float | str = 1.0,
        backoff_max: float | str = 30.0,
        image_detail: str | None = None,
        token_param: str = "max_tokens",
        cache: str | None = None,
        **aliases: Any,
    ):
        for alias, value in aliases.items():
            if alias not in _ALIASES:
                known = "api_key_env, max_concurrency, timeout, max_retries, backoff, backoff_max, "
                known += "image_detail, token_param, cache"
                raise BadInput(f"unknown openai model option {alias!r}; known: {known}", field="--model")
            name = _ALIASES[alias]
            if name == "api_key_env":
                api_key_env = value
            elif name == "max_concurrency":
                max_concurrency = value
            else:
                backoff = value
        if base_url is None and "@" in model:
            model, base_url = split_target(model)
        if image_detail not in (None, "", "auto", "low", "high"):
            raise BadInput(f"image_detail must be auto, low or high, got {image_detail!r}", field="--model")
        if token_param not in ("max_tokens", "max_completion_tokens"):
            raise BadInput(
                f"token_param must be max_tokens or max_completion_tokens, got {token_param!r}",
                field="--model",
            )
        self.client = ChatClient(
            model=model,
            base_url=base_url,
            api_key_env=str(api_key_env),
            timeout=_number("timeout", timeout, float),
            max_retries=_number("max_retries", max_retries, int),
            backoff_initial=_number("backoff", backoff, float),
            backoff_max=_number("backoff_max", backoff_max, float),
            max_concurrency=_number("max_concurrency", max_concurrency, int),
        )
        self.model = self.client.model
        self.base_url = self.client.base_url
        self.image_detail = image_detail or None
        self.token_param = token_param
        self.spec = spec or f"openai:{self.model}" + (f"@{base_url}" if base_url else "")
        self._cache_path = cache
        self._cache: Any = None
        self.cache_hits = 0
        self._hits_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIModel(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def fingerprint(self) -> str:
        """Hash of (model name, base URL, options that change answers) — never the key."""
        return stable_hash({"adapter": "openai", **self._identity()})

    def describe(self) -> dict[str, Any]:
        """What a run records about this model (the key's variable name, never the key)."""
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "base_url": self.base_url,
            "image_detail": self.image_detail,
            "api_key_env": self.client.api_key_env,
            "max_concurrency": self.client.max_concurrency,
        }

    def _identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = dict(self.client.identity)
        if self.image_detail:
            identity["image_detail"] = self.image_detail
        return identity

    # -- request rendering -------------------------------------------------------------------------

    def _image_part(self, url: str) -> dict[str, Any]:
        image_url: dict[str, Any] = {"url": url}
        if self.image_detail:
            image_url["detail"] = self.image_detail
        return {"type": "image_url", "image_url": image_url}

    def render_messages(self, prompt: Prompt, image: str | bytes) -> list[dict[str, Any]]:
        """OpenAI chat messages for one prompt: the `{"type": "image"}` part becomes a data URL.

        A raw-text prompt (`Prompt.text`) becomes one user message, the image first and the text
        with its `<image>` placeholder removed. Messages without an image part get the image
        prepended to the first user message.
        """
        url = image_data_url(image)
        if prompt.text is not None and not prompt.messages:
            text = prompt.text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
            return [{"role": "user", "content": [self._image_part(url), {"type": "text", "text": text}]}]
        if not prompt.messages:
            raise BadInput("a prompt has neither messages nor text", field="prompt")
        out: list[dict[str, Any]] = []
        placed = False
        for message in prompt.messages:
            content = message.get("content", "")
            if isinstance(content, str):
                parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
            else:
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind == "image":
                        parts.append(self._image_part(url))
                        placed = True
                    elif kind == "text":
                        parts.append({"type": "text", "text": str(part.get("text", ""))})
                    else:
                        parts.append(dict(part))
            out.append({"role": message.get("role", "user"), "content": parts})
        if not placed:
            first_user = next((m for m in out if m["role"] == "user"), None)
            if first_user is None:
                raise BadInput("a chat prompt has no user message to attach the image to", field="prompt")
            first_user["content"].insert(0, self._image_part(url))
        for message in out:  # text-only content as a plain string: every server takes that
            if all(p.get("type") == "text" for p in message["content"]):
                message["content"] = "\n".join(p["text"] for p in message["content"])
        return out

    def request_params(self, settings: GenerationSettings) -> dict[str, Any]:
        """Sampling parameters of the chat request for these generation settings."""
        params: dict[str, Any] = {self.token_param: int(settings.max_new_tokens), "seed": int(settings.seed)}
        if settings.do_sample:
            params["temperature"] = float(settings.temperature)
            params["top_p"] = float(settings.top_p)
        else:
            params["temperature"] = 0.0
        return params

    # -- generation --------------------------------------------------------------------------------

    def _get_cache(self) -> Any:
        if self._cache is None and self._cache_path:
            from medvqa.cache import ResponseCache

            self._cache = ResponseCache(self._cache_path)
        return self._cache

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings) -> list[str]:
        """One answer per request, in order; up to `max_concurrency` requests in flight.

        Each request is sent with its own `seed` (`GenerationRequest.seed`, else `settings.seed`),
        so n samples of one question are n requests with n seeds, and a sampled answer does not
        depend on the batch it came in. With `cache=PATH`, a reply is stored the moment it arrives
        (before anything else can fail on it), keyed by (model, base URL, prompt, image, params incl.
        the seed): a rerun of a seeded or greedy request is answered from disk.
        """
        from medvqa.cache import is_cacheable, request_key

        base = self.request_params(settings)
        cache = self._get_cache()
        use_cache = cache is not None and is_cacheable({**base, "do_sample": settings.do_sample})

        def one(request: GenerationRequest) -> str:
            params = base if request.seed is None else {**base, "seed": int(request.seed)}
            messages = self.render_messages(request.prompt, request.image)
            key = None
            if use_cache:
                key = request_key(
                    self._identity(),
                    {"prompt": _prompt_json(request.prompt), "image": image_sha256(request.image), **params},
                )
                hit = cache.get(key)
                if hit is not None:
                    with self._hits_lock:
                        self.cache_hits += 1
                    return str(hit).strip()
            try:
                text = self.client.complete(messages, **params)
            except EndpointError as exc:
                if exc.status in (400, 413, 422):  # this request can never work: a usage error
                    raise BadInput(
                        f"{exc}; check that the model accepts images and these options "
                        f"({', '.join(sorted(params))})",
                        record=request.id or None,
                    ) from None
                if request.id:
                    raise EndpointError(
                        f"{exc} (record {request.id})", status=exc.status, retryable=exc.retryable
                    ) from None
                raise
            if key is not None:
                cache.put(key, text, request={"id": request.id, "model": self.model, **params})
            return text.strip()

        return map_bounded(one, requests, self.client.max_concurrency)

    @property
    def stats(self) -> dict[str, int]:
        return {**self.client.stats.to_json(), "cache_hits": self.cache_hits}

    def close(self) -> None:
        self.client.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def _prompt_json(prompt: Prompt) -> Mapping[str, Any]:
    return {"messages": [dict(m) for m in prompt.messages], "text": prompt.text}
