"""A small client for `actcache serve` (standard library only).

    from actcache.client import Client
    c = Client("http://127.0.0.1:8765")
    recs = c.neighbors("last", texts=["a gripping, funny film"], k=4)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .errors import ActcacheError, BusyError, ConfigError, StoreError


class ServerError(ActcacheError):
    """The service answered with an error (its message says what to change)."""


class Client:
    """Calls the service at `url` (e.g. http://127.0.0.1:8765), with an optional bearer token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                msg = e.reason
            where = f"{msg} (server {self.url}, HTTP {e.code})"
            if e.headers.get("Retry-After"):
                raise BusyError(where, retry_after=int(e.headers["Retry-After"]), queue_full=e.code == 429) from None
            cls = StoreError if e.code in (404, 503) else ConfigError if e.code in (400, 413, 422) else ServerError
            raise cls(where) from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"cannot reach {self.url} ({getattr(e, 'reason', e)}); start it with "
                              f"`actcache serve`") from None

    def health(self) -> bool:
        return bool(self._call("GET", "/healthz").get("ok"))

    def builds(self) -> list[dict]:
        return self._call("GET", "/v1/builds")

    def info(self, key: str) -> dict:
        return self._call("GET", f"/v1/builds/{key}")

    @staticmethod
    def search_body(search: dict) -> dict:
        """The request fields of QueryConfig's search options (labels, ids,
        exclude_ids, min_score, offset, fields); those left at their default are left out."""
        filt = {n: list(search[n]) for n in ("labels", "ids", "exclude_ids") if search.get(n)}
        body = {"filter": filt or None, "min_score": search.get("min_score"),
                "offset": search.get("offset") or None,
                "fields": list(search["fields"]) if search.get("fields") is not None else None}
        return {k: v for k, v in body.items() if v is not None}

    def neighbors(self, key: str, ids=None, texts=None, inputs=None, jsonl=None, **opts) -> list[dict]:
        """Query records (as `actcache query` writes them) for eval ids, new texts,
        JSON input objects, or the lines of a JSONL file (parsed as `--input` parses
        them); opts: component, layer, pooling, mask, k, balanced, exclude_self,
        text_field, source, vectors, filter, min_score, offset, fields."""
        body = {k: v for k, v in dict(ids=ids, texts=texts, inputs=inputs, jsonl=jsonl, **opts).items()
                if v is not None}
        return self._call("POST", f"/v1/builds/{key}/neighbors", body)

    def select(self, key: str, strategy: str, **opts) -> list[dict]:
        """Records of a selection strategy (as `actcache query --strategy`)."""
        return self._call("POST", f"/v1/builds/{key}/select", {"strategy": strategy, **opts})
