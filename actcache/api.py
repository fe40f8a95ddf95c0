"""The HTTP contract of `actcache serve`: request and response models.

Requests are strict: an unknown field, or a value of the wrong JSON type
(`"k": "4"`, `"k": true`), is a 422 with the one error shape (`Error`).
Responses are documented by the models below, which the records of
`actcache query` and `select` satisfy; the service sends the records as they
are (no re-encoding).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .query import QueryConfig
from .service import ServeLimits


def check_text(value) -> None:
    """Raise ValueError if a request string (nested in lists/dicts) holds a lone
    surrogate: JSON can escape one ("\\ud800"), but it is no text, and it cannot
    be hashed for the query cache, encoded or written back."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                                 "send valid Unicode") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_text(v)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _text(self):
        check_text(self.__dict__)
        return self


class Error(BaseModel):
    """Every error: one line saying what to change, and the request's id."""

    error: str
    request_id: str | None = None


class Neighbor(BaseModel):
    id: str
    score: float
    text: str
    label: int
    rank: int


class NeighborsRecord(BaseModel):
    """One input's neighbours, as a line of `actcache query`'s JSONL."""

    test_id: str | None = None
    test_text: str | None = None
    test_label: int | None = None
    neighbors: list[Neighbor] | None = None
    metric: str | None = None
    array: str | None = None
    build_key: str | None = None
    config: dict | None = None
    k: int | None = None


class SelectRecord(BaseModel):
    """One line of `actcache query --strategy`: a chosen example (subset
    strategies) or one input's demonstrations (per-input strategies)."""

    strategy: str
    build_key: str
    config: dict
    rank: int | None = None
    id: str | None = None
    pool_position: int | None = None
    test_id: str | None = None
    ids: list[str] | None = None


class BuildRow(BaseModel):
    """A build of the store, as `actcache ls --json` lists it (paths cut to their last component)."""

    model_config = ConfigDict(extra="allow")
    key: str
    status: str


class Health(BaseModel):
    ok: bool
    forward_batches: int


class LaneState(BaseModel):
    ready: bool
    queued: int
    capacity: int
    busy_s: float
    done: int


class Ready(BaseModel):
    """Whether each lane can take a request now (alive, queue not full)."""

    ready: bool
    lanes: dict[str, LaneState]


class Filter(Strict):
    """Which pool examples may be returned (all given conditions hold)."""

    labels: list[int] | None = Field(None, description="Pool classes that may be returned.")
    ids: list[str] | None = Field(None, description="Pool ids that may be returned.", max_length=100_000)
    exclude_ids: list[str] | None = Field(None, description="Pool ids never returned.", max_length=100_000)


def request_models(limits: ServeLimits):
    """(Neighbors, Select): the request bodies under `limits`."""

    class Neighbors(Strict):
        ids: list[str] | None = Field(None, description="Eval-row ids of the build (default: every eval row).",
                                      max_length=limits.max_ids)
        texts: list[str] | None = Field(None, description="New input texts (filled into the build's template).",
                                        max_length=limits.max_texts)
        inputs: list[dict] | None = Field(None, description="New inputs as JSON objects (template fields, "
                                                             "optional id), as lines of a JSONL --input.",
                                          max_length=limits.max_texts)
        jsonl: list[str] | None = Field(None, description="Lines of a JSONL input file, parsed as `actcache "
                                                          "query --input` parses them (messages name `source`).",
                                        max_length=limits.max_texts)
        vectors: list[list[float]] | None = Field(None, description="Raw query vectors in the array's space "
                                                                    "(its width; normalised as stored rows are).",
                                                  max_length=limits.max_vectors)
        filter: Filter | None = None
        min_score: float | None = Field(None, description="Drop neighbours scoring below this (higher is "
                                                           "more similar for every metric).")
        offset: int = Field(0, ge=0, le=1_000_000, description="Skip this many ranked neighbours (k is the page).")
        fields: list[str] | None = Field(None, description="Keep only these keys of each record.")
        component: str = QueryConfig.component
        layer: int = QueryConfig.layer
        pooling: str = QueryConfig.pooling
        mask: str = QueryConfig.mask
        k: int = Field(QueryConfig.k, ge=1, le=10_000)
        balanced: bool = QueryConfig.balanced
        exclude_self: bool = QueryConfig.exclude_self
        text_field: str = QueryConfig.text_field
        source: str = Field("request", description="Echoed in each record's config (the CLI client sends "
                                                   "its --input name, so records equal the local command's).")

        @model_validator(mode="after")
        def _size(self):
            lines = self.texts or self.jsonl or []
            if any(len(t) > limits.max_text_chars for t in lines):
                raise ValueError(f"an input is over {limits.max_text_chars} characters (the server's limit)")
            if sum(len(t) for t in lines) > limits.max_request_chars:
                raise ValueError(f"the inputs hold over {limits.max_request_chars} characters in all (the "
                                 f"server's limit); send them in several requests")
            return self

    class Select(Strict):
        strategy: str
        budget: int | None = Field(None, ge=1, le=1_000_000)
        k: int | None = Field(None, ge=1, le=10_000)
        seed: int = 0
        # None: the strategy's own default (as `actcache.select.select`)
        component: str | None = None
        layer: int | None = None
        pooling: str | None = None
        mask: str | None = None
        balanced: bool | None = None
        exclude_self: bool | None = None
        stat: str | None = None
        order: str | None = None
        feature: int | None = Field(None, ge=0, description="sae-feature: the feature to rank by.")
        sae: str | None = Field(None, max_length=64, description="sae-knn / sae-feature: the SAE's key prefix.")

    return Neighbors, Select


__all__ = ["check_text", "Filter", "Error", "Neighbor", "NeighborsRecord", "SelectRecord", "BuildRow", "Health", "LaneState", "Ready",
           "request_models"]
