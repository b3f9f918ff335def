"""A minimal Ethereum JSON-RPC client over HTTP POST (host side: tests, relay, bench, deploy)."""

from __future__ import annotations

import itertools
from typing import Any

import requests


class RpcError(Exception):
    """The node answered with a JSON-RPC error (``code``, ``message``, ``data``) or not at all."""

    def __init__(self, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.data = code, data


class RpcClient:
    def __init__(self, url: str, *, timeout_s: float = 30.0, session: requests.Session | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._session = session or requests.Session()
        self._ids = itertools.count(1)

    def call(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            response = self._session.post(self.url, json=body, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RpcError(f"{method}: no answer from {self.url} ({type(exc).__name__})") from None
        try:
            answer = response.json()
        except ValueError:
            raise RpcError(f"{method}: HTTP {response.status_code}, not JSON") from None
        if not isinstance(answer, dict):
            raise RpcError(f"{method}: answer is not a JSON object")
        if answer.get("error") is not None:
            err = answer["error"] if isinstance(answer["error"], dict) else {"message": str(answer["error"])}
            raise RpcError(f"{method}: {err.get('message')}", code=err.get("code"), data=err.get("data"))
        return answer.get("result")

    def call_int(self, method: str, *params: Any) -> int:
        return int(self.call(method, *params), 16)

    def __repr__(self) -> str:
        return f"RpcClient({self.url!r})"

