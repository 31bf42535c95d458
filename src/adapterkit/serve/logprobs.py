"""Engine log-probs (`types.TokenLogprob`) in OpenAI's two wire shapes.

* Completions (the legacy shape, as vLLM answers it)::

      {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
       "text_offset": [int]}

  ``top_logprobs[i]`` holds the k most likely tokens at position i plus the token itself (so up
  to k + 1 entries, as vLLM). The first prompt token of an echo has ``None`` for both (nothing
  predicts it). ``text_offset[i]`` is where token i starts in the choice's ``text`` (the prompt
  included with ``echo``), counted as the sum of the previous tokens' string lengths.
* Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}`` with exactly k ``top_logprobs`` per token, best first.

Token strings are decoded with a few tokens of context before them, so tokenizers that drop a
word's leading space when a token is decoded alone (SentencePiece) still show it; a token that
is only part of a UTF-8 character reads as its lone decode (usually "\\ufffd"). ``bytes`` is the
UTF-8 encoding of that string.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterkit.serve.types import TokenLogprob

_CONTEXT = 4  # tokens of context when decoding one token


class LogprobFormatter:
    """Formats the log-probs of one request, chunk after chunk (offsets and decoding context
    carry over between stream chunks).

    Args:
        tokenizer: the engine's HF tokenizer, or None (tokens then read ``token_id:<id>``, as
            vLLM's ``return_tokens_as_token_ids``).
        context: token ids before the first token to be formatted (the prompt, when the
            generated tokens are formatted without echo).
    """

    def __init__(self, tokenizer: Any | None, context: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ctx: list[int] = list(context)[-_CONTEXT:]
        self.offset = 0

    def _piece(self, prev: str, token_id: int) -> str:
        if self.tok is None:
            return f"token_id:{token_id}"
        if self.ctx:
            cur = self.tok.decode(self.ctx + [token_id])
            if cur.startswith(prev) and len(cur) > len(prev):
                return cur[len(prev):]
        return self.tok.decode([token_id])

    def _walk(self, entries: Sequence[TokenLogprob]) -> list[tuple[str, TokenLogprob, dict[int, str]]]:
        """(token string, entry, {alternative id: string}) per entry; advances the context."""
        out = []
        for e in entries:
            prev = self.tok.decode(self.ctx) if self.tok is not None and self.ctx else ""
            alts = {tid: self._piece(prev, tid) for tid, _ in e.top}
            out.append((alts.get(e.token_id) or self._piece(prev, e.token_id), e, alts))
            self.ctx = (self.ctx + [e.token_id])[-_CONTEXT:]
        return out

    def completion(self, entries: Sequence[TokenLogprob]) -> dict[str, list[Any]]:
        """The legacy completions ``logprobs`` object for `entries` (see the module doc)."""
        body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, e, alts in self._walk(entries):
            body["tokens"].append(text)
            body["token_logprobs"].append(e.logprob)
            top: dict[str, float] | None = None
            if e.logprob is not None:
                top = {}
                for tid, lp in e.top:
                    top.setdefault(alts[tid], lp)  # two ids with one string: keep the likelier
                top.setdefault(text, e.logprob)
            body["top_logprobs"].append(top)
            body["text_offset"].append(self.offset)
            self.offset += len(text)
        return body

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, list[dict[str, Any]]]:
        """The chat ``logprobs`` object (``{"content": [...]}``) for `entries`."""
        content = []
        for text, e, alts in self._walk(entries):
            content.append({"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": alts[tid], "logprob": lp,
                                              "bytes": list(alts[tid].encode("utf-8"))} for tid, lp in e.top]})
        return {"content": content}

