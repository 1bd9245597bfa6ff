"""A small synchronous client of a memserver's HTTP control API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_TIMEOUT = 30.0


class MemserverAPIError(Exception):
    """The memserver refused a request, or could not be reached."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        where = f"{url} answered {status}" if status else f"{url} unreachable"
        super().__init__(f"{where}: {message}")
        self.status = status
        self.message = message


class MemserverClient:
    """Talks to one memserver at ``url`` (e.g. ``http://10.0.0.5:10810``)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def exchange(
        self, method: str, path: str, data: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """One HTTP request as sent; ``(status, content type, body)`` whatever
        the status.  Raises MemserverAPIError only if nothing answered."""
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return (
                    response.status,
                    response.headers.get("Content-Type", ""),
                    response.read(),
                )
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MemserverAPIError(self.url, None, str(reason)) from None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        status, ctype, raw = self.exchange(method, path, data)
        if status >= 400:
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace") or f"HTTP {status}"
            raise MemserverAPIError(self.url, status, message)
        if not raw:
            return None
        return json.loads(raw) if "json" in ctype else raw.decode()

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/health"))

    def list_exports(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/exports")["exports"])

    def create_export(self, size: int, label: str = "") -> dict[str, Any]:
        return dict(self._call("POST", "/v1/exports", {"size": size, "label": label}))

    def delete_export(self, name: str) -> None:
        self._call("DELETE", f"/v1/exports/{name}")

    def metrics(self) -> str:
        return str(self._call("GET", "/metrics"))
