"""`http`: an OpenAI-compatible chat-completions endpoint as the pairwise judge.

Any server that speaks the chat-completions protocol will do: the OpenAI API, vLLM,
llama.cpp's server, Ollama, a gateway. The judge is `positional`: the labeller asks each pair
in both orders, one request per question, `oracle.batch_size` requests in
flight at once. The reply must name one of `oracle.choices` and nothing else ("A", "B.",
"**Response B**" are read; "A is better than B" is not): an answer that is neither, or a
body that is not chat-completions JSON, fails the attempt rather than becoming a label.

Each request is retried on its own (`retry.retrying`), so one dropped connection does not
re-ask, and re-pay for, the whole batch. Errors that no retry can fix, a refused key or a
malformed request (4xx), stop at once.

The API key is read from the environment variable `oracle.api_key_env` names, so a recipe
(which is copied into every run folder) never holds it; it is sent in the Authorization
header and removed from anything an error message quotes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.oracles.base import JudgeConfig, Offers, OracleError, check_batch, one_line
from rlhf_bilevel.oracles.pairwise import ask_as_shown
from rlhf_bilevel.oracles.retry import GaveUp, retrying

EXAMPLE_URL = "http://127.0.0.1:8000/v1/chat/completions"
RETRYABLE = {408, 409, 429}  # 4xx codes that mean "later", not "never"
QUOTE = 120  # characters of a server's answer quoted in an error message


@dataclass(frozen=True)
class HttpConfig(JudgeConfig):
    url: str | None = field(
        default=None, metadata={"help": "the chat-completions endpoint, e.g. http://127.0.0.1:8000/v1/chat/completions (required)"}
    )
    model: str | None = field(default=None, metadata={"help": "the model the endpoint serves, e.g. gpt-4o-mini (required)"})
    api_key_env: str | None = field(
        default=None, metadata={"help": "the environment variable holding the API key; the key never goes in a recipe"}
    )
    batch_size: int = field(default=8, metadata={"help": "requests in flight at once (> 0)"})
    timeout: float = field(default=60.0, metadata={"help": "seconds a request may take before that attempt has failed (> 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "batch_size", "timeout")


def http_oracle(cfg: HttpConfig) -> HttpJudge:
    if cfg.url is None:
        raise ConfigError(f"oracle.url: the http oracle needs the chat-completions endpoint, e.g. oracle.url={EXAMPLE_URL}")
    parts = urllib.parse.urlsplit(cfg.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"oracle.url: expected an http:// or https:// URL, e.g. {EXAMPLE_URL}, got {cfg.url!r}")
    if cfg.model is None:
        raise ConfigError("oracle.model: the http oracle needs the name of the model the endpoint serves, e.g. oracle.model=gpt-4o-mini")
    key = None
    if cfg.api_key_env is not None:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ConfigError(
                f"oracle.api_key_env: the environment variable {cfg.api_key_env} is not set; "
                "export it, or drop api_key_env for an endpoint that needs no key"
            )
    return HttpJudge(cfg, key)


class HttpJudge:
    """A pairwise judge behind HTTP: it offers no gold score, and answers for the order it is shown."""

    offers = Offers.COMPARISON
    positional = True

    def __init__(self, cfg: HttpConfig, key: str | None):
        self.cfg, self.key = cfg, key
        # urllib's own User-Agent is turned away by some gateways in front of hosted APIs
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rlhf-bilevel"}
        if key is not None:
            self.headers["Authorization"] = f"Bearer {key}"
        self.where = f"http: {cfg.url}"
        self.name = "http"

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
        check_batch(prompts, first, second)
        return ask_as_shown(self.first_named, self.cfg, prompts, first, second)

    def first_named(self, questions: list[str]) -> Tensor:
        """[N] 1 where the endpoint named the response shown first, 0 where it named the second."""
        pool = ThreadPoolExecutor(max_workers=min(self.cfg.batch_size, len(questions)), thread_name_prefix="oracle-http")
        try:
            futures = [pool.submit(retrying, lambda q=q: self.ask(q), self.cfg.retries, self.cfg.backoff) for q in questions]
            return torch.tensor([float(future.result()) for future in futures], device="cpu")
        finally:
            pool.shutdown(cancel_futures=True)  # after a final failure, the questions not yet sent never are

    def ask(self, question: str) -> bool:
        """Whether the endpoint names the response shown first; one request, one attempt."""
        content = self.post({"model": self.cfg.model, "messages": [{"role": "user", "content": question}], "temperature": 0})
        named = chosen(content, self.cfg.choices)
        if named is None:
            a, b = self.cfg.choices
            raise OracleError(f"{self.where}: the judge answered {self.quote(content)}, which is neither {a!r} nor {b!r}")
        return named == 0

    def post(self, payload: dict) -> str:
        """The reply text of one chat completion, or an OracleError (a GaveUp when retrying cannot help)."""
        request = urllib.request.Request(self.cfg.url, data=json.dumps(payload).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise self.refused(error) from None
        except (http.client.HTTPException, OSError) as error:  # refused, reset, timed out (URLError is an OSError)
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise OracleError(f"{self.where}: no answer within {self.cfg.timeout:g} s (oracle.timeout)") from None
            raise OracleError(self.redact(f"{self.where}: {one_line(reason) if isinstance(reason, BaseException) else reason}")) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = raw.decode("utf-8", "replace")
            raise OracleError(f"{self.where}: the answer is not chat-completions JSON with choices[0].message.content: {self.quote(text)}") from None
        if not isinstance(content, str):
            raise OracleError(f"{self.where}: choices[0].message.content is {type(content).__name__}, not text")
        return content

    def refused(self, error: urllib.error.HTTPError) -> OracleError:
        status = f"{self.where}: HTTP {error.code} {error.reason}"
        if error.code in (401, 403):  # the server's body may quote the key back: it is not shown
            hint = f"check the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env else "the endpoint wants a key: set oracle.api_key_env"
            return GaveUp(f"{status}; {hint}")
        try:
            body = error.read().decode("utf-8", "replace")
        except OSError:  # the body may be cut short too; the status alone still says what happened
            body = ""
        message = f"{status}: {self.quote(body)}"
        if error.code == 404:
            return GaveUp(f"{message}; oracle.url must be the chat-completions endpoint itself, e.g. {EXAMPLE_URL}")
        if 400 <= error.code < 500 and error.code not in RETRYABLE:
            return GaveUp(message)
        return OracleError(message)

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def quote(self, text: str) -> str:
        """A server's text for an error message: redacted before it is cut, so no part of the key survives."""
        return repr(self.redact(text)[:QUOTE])


def chosen(content: str, choices: Sequence[str]) -> int | None:
    """Which choice a reply names: 0, 1, or None unless the reply is that name and nothing else,
    give or take case, markup and the words 'response' or 'answer'."""
    words = [w for w in re.sub(r"[*_`'\"()\[\].:,!]", " ", content).split() if w.casefold() not in ("response", "answer")]
    if len(words) != 1:
        return None
    names = [c.casefold() for c in choices]
    return names.index(words[0].casefold()) if words[0].casefold() in names else None
