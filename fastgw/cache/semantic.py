"""The semantic cache: after an exact miss, a request of an opted-in model is answered with the stored answer of a
similar earlier prompt (cosine similarity of their embeddings >= the model's threshold).

The relay (fastgw/proxy/relay.pyx, `_cache_lookup` and `_cache_later`) asks, in order:

    query(ex)        None when this request is not looked up by similarity (its model did not opt in, an
                     endpoint without a prompt, a prompt with images or too long); else a Query: the partition
                     and the prompt's text (fastgw.cache.semantic_text), kept on ex.cache_semantic
    await search(q)  the embedding of the text (fastgw.cache.embedder: a failure or timeout is None, a miss), then
                     the partition's index: (exact-cache key, similarity) or None
    forget(q, key)   the exact cache no longer has that key's entry: the vector goes
    added(q, key)    the answer of a miss was stored under `key`: its vector joins the index (every worker's:
                     fastgw.cache.semantic_index); a refresh (no-cache) embeds its prompt in the background first

A partition is who may share an answer and what it answers: the endpoint, the virtual model, the scope (the
consumer, its group, or nothing, as the exact cache's [cache] scope) and every parameter other than the prompt
(semantic_text.params_digest). So a similar prompt from another consumer, or with other parameters, misses.
"""
from __future__ import annotations

import asyncio
import os

import orjson

from fastgw.cache.embedder import Embedder
from fastgw.cache.semantic_index import SemanticIndexes, SharedLog
from fastgw.cache.semantic_text import TEXT_FIELDS, params_digest, prompt_text


class Query:
    __slots__ = ("partition", "text", "vector", "threshold", "searched")

    def __init__(self, partition: bytes, text: str, threshold: float):
        self.partition = partition
        self.text = text
        self.vector = None               # set by search once embedded
        self.threshold = threshold
        self.searched = False            # search ran (a refresh's query never does: its prompt is embedded later)


class SemanticCache:
    def __init__(self, cfg, router, run_dir: str, loop, log, stats):
        """cfg: fastgw.runtime.config.Cache (its `semantic` section and `scope`)."""
        s = cfg.semantic
        self.scope = cfg.scope
        self.models = frozenset(s.models)
        self.threshold = s.threshold
        self.model_threshold = dict(s.model_threshold)
        self.max_text_chars = s.max_text_chars
        self.loop = loop
        self.log = log
        route = router.resolve(s.embeddings_model)
        self.embedder = Embedder(s.embeddings_model, list(route.deployments), s.timeout, s.retry_interval, loop,
                                 log, stats)
        log_path = os.path.join(run_dir, f"fastgw-semantic-{s.log_bytes}.log")
        self.indexes = SemanticIndexes(SharedLog(log_path, s.log_bytes), s.max_entries, s.max_indexes)
        self.tasks: set = set()

    def query(self, ex) -> Query | None:
        route = ex.route
        name = route.name if route is not None else ex.model
        if name not in self.models or ex.endpoint not in TEXT_FIELDS:
            return None
        try:
            req = orjson.loads(ex.body)
        except orjson.JSONDecodeError:
            return None
        if type(req) is not dict:
            return None
        text = prompt_text(req, ex.endpoint)
        if text is None or len(text) > self.max_text_chars:
            return None
        scope = ex.consumer if self.scope == "consumer" else ex.group if self.scope == "group" else ""
        partition = b"\0".join((ex.endpoint.encode(), name.encode(), scope.encode(),
                                params_digest(req, ex.endpoint)))
        return Query(partition, text, self.model_threshold.get(name, self.threshold))

    async def search(self, q: Query):
        """(key, similarity) of the most similar stored prompt at or above the threshold, else None. Never
        raises: a failure is a miss."""
        q.searched = True
        try:
            q.vector = await self.embedder.embed(q.text)
            if q.vector is None:
                return None
            return self.indexes.search(q.partition, q.vector, q.threshold)
        except Exception:
            self.log.exception("semantic cache lookup failed")
            return None

    def forget(self, q: Query, key: bytes) -> None:
        self.indexes.forget(q.partition, key)

    def added(self, q: Query, key: bytes) -> None:
        if q.vector is not None:
            try:
                self.indexes.add(q.partition, q.vector, key)
            except (OSError, ValueError):    # closed by a reload meanwhile: this one answer is not indexed
                self.log.warning("semantic cache store failed")
            return
        if q.searched:                       # its embedding failed: this answer is found exactly only
            return
        task = self.loop.create_task(self._embed_and_add(q, key))
        self.tasks.add(task)             # kept until done (the loop holds tasks weakly)
        task.add_done_callback(self.tasks.discard)

    async def _embed_and_add(self, q: Query, key: bytes) -> None:
        try:
            q.vector = await self.embedder.embed(q.text)
            if q.vector is not None:
                self.indexes.add(q.partition, q.vector, key)
        except Exception:
            self.log.exception("semantic cache store failed")

    def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        self.embedder.close()
        self.indexes.close()
