"""Supervised fine-tuning data: JSONL / lists / torch Datasets -> token ids + loss labels.

Accepted example shapes (one JSON object per line in a ``.jsonl`` file, or dicts in a list):

- ``{"prompt": str, "completion": str}``: plain text, the loss is on the completion (+ EOS).
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered with the tokenizer's chat
  template; the loss is on the assistant turns only (their content and end-of-turn tokens).
- ``{"input_ids": [...], "labels": [...]}`` (labels optional: then every token is trained):
  already tokenized, used as is (truncated to ``max_length``).

Labels are aligned with ``input_ids`` (not shifted) and hold -100 where no loss is taken,
the convention of HF ``*ForCausalLM`` models, so the same dataset also feeds ``transformers.Trainer``.

Why chat spans come from prefix rendering rather than ``return_assistant_tokens_mask``: that
option needs ``{% generation %}`` tags, which most published templates lack. Instead each
assistant turn ``i`` is located by rendering ``messages[:i]`` with the generation prompt (where
the answer starts) and ``messages[:i+1]`` (where it ends); both must be prefixes of the full
rendering. Each text segment is then tokenized on its own, which matches inference exactly:
there the prompt is tokenized alone and the answer is generated after it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import DataError

IGNORE_INDEX = -100
FORMATS = ('{"prompt", "completion"}', '{"messages": [{"role", "content"}, ...]}', '{"input_ids"[, "labels"]}')


@dataclass(frozen=True)
class Example:
    """One tokenized training example.

    Attributes:
        input_ids: (T,) int64 token ids.
        labels: (T,) int64, equal to ``input_ids`` where the loss is taken, -100 elsewhere.
        source: where it came from, for error messages (``"file.jsonl:12"`` or ``"example 3"``).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str

    @property
    def num_supervised(self) -> int:
        """Tokens that are predicted with a loss (label at position t is predicted from < t)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts (blank lines skipped).

    Raises:
        DataError: missing file, invalid JSON or a non-object line (names ``file:line``),
            or a file with no examples.
    """
    return [rec for _, rec in _read_jsonl(Path(path))]


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    out: list[tuple[str, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append((where, rec))
    if not out:
        raise DataError(f"{path}: the file holds no examples (empty or only blank lines)")
    return out


def _require_str(rec: Mapping[str, Any], key: str, where: str) -> str:
    val = rec[key]
    if not isinstance(val, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(val).__name__}")
    return val


def _ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids with the tokenizer's own special-token policy (e.g. a leading BOS).

    Two pitfalls are avoided: a prompt that already starts with the BOS text (a rendered
    chat template) gets no second BOS, and an EOS that a post-processor appends to every
    sequence is dropped (the completion follows the prompt, it does not end there).
    """
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and prompt.startswith(bos):
        return _ids(tokenizer, prompt)
    ids = _ids(tokenizer, prompt, add_special_tokens=True)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids and ids[-1] == eos and not prompt.rstrip().endswith(str(getattr(tokenizer, "eos_token", ""))):
        ids = ids[:-1]
    return ids


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja errors (raise_exception in templates) are plain Exceptions
        raise DataError(f"{where}: the tokenizer's chat template failed on these messages: {e}") from e
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def chat_segments(messages: list[dict[str, str]], tokenizer: Any, where: str = "example") -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_assistant)`` segments.

    Concatenating the texts gives exactly ``apply_chat_template(messages, tokenize=False)``.
    An assistant segment spans from the end of the generation prompt to the end of the
    rendered turn, so it includes the end-of-turn marker (the model must learn to stop).

    Raises:
        DataError: the template is not prefix-stable (rendering a prefix of the conversation
            is not a prefix of the full rendering), so turns cannot be located.
    """
    full = _render(tokenizer, messages, False, where)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        end = _render(tokenizer, messages[: i + 1], False, where)
        try:
            start = _render(tokenizer, messages[:i], True, where)
        except DataError:
            if i > 0:
                raise
            start = "\0"  # many templates refuse an empty conversation: use the fallback below
        if i == 0 and not end.startswith(start):
            # the conversation opens with the assistant: its header is what precedes the content
            cut = end.rfind(msg["content"]) if msg["content"] else -1
            start = end[:cut] if cut >= 0 else end
        if not (full.startswith(start) and full.startswith(end) and pos <= len(start) <= len(end)):
            raise DataError(
                f"{where}: cannot locate assistant turn {i}: the chat template does not render "
                "conversation prefixes as prefixes of the full conversation (e.g. it rewrites "
                "earlier turns); split the conversation into one example per assistant turn"
            )
        segments.append((full[pos : len(start)], False))
        segments.append((full[len(start) : len(end)], True))
        pos = len(end)
    segments.append((full[pos:], False))
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos:
        # "...<|im_end|>\n": the model stops at EOS and never generates what follows it, so
        # the whitespace after an end-of-turn EOS is moved out of the supervised span.
        for k, (text, sup) in enumerate(segments[:-1]):
            body = text.rstrip()
            if sup and body.endswith(eos) and len(body) < len(text):
                nxt_text, nxt_sup = segments[k + 1]
                segments[k] = (body, True)
                segments[k + 1] = (text[len(body) :] + nxt_text, nxt_sup)
    return [(text, sup) for text, sup in segments if text]


def _validate_messages(rec: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out: list[dict[str, str]] = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{j}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: messages[{j}] is missing the key {key!r} (has {sorted(m)})")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: messages[{j}][{key!r}] must be a string, got {type(m[key]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        roles = [m["role"] for m in out]
        raise DataError(f"{where}: no message with role 'assistant' (roles: {roles}), so nothing to learn")
    return out


def tokenize_example(
    rec: Mapping[str, Any],
    tokenizer: Any | None,
    max_length: int | None = None,
    where: str = "example",
    add_eos: bool = True,
) -> Example:
    """Turn one raw example into token ids and loss labels (see the module docstring).

    Args:
        rec: one example dict.
        tokenizer: an HF tokenizer; needed for the text formats, not for ``input_ids``.
        max_length: keep at most this many tokens (right truncation: the start is kept).
        where: label for error messages (``file:line``).
        add_eos: append EOS after a completion (so the model learns to stop).
    Raises:
        DataError: missing keys, wrong types, no tokenizer / chat template, or no supervised
            token left after truncation.
    """
    if "input_ids" in rec:
        ids = torch.as_tensor(rec["input_ids"], dtype=torch.long).flatten()
        labels = torch.as_tensor(rec["labels"], dtype=torch.long).flatten() if "labels" in rec else ids.clone()
        if labels.shape != ids.shape:
            raise DataError(f"{where}: 'labels' has {labels.numel()} entries but 'input_ids' has {ids.numel()}")
    elif "messages" in rec or "prompt" in rec or "completion" in rec:
        if tokenizer is None:
            raise DataError(f"{where}: text examples need a tokenizer (pass tokenizer=...)")
        ids_list: list[int] = []
        lab_list: list[int] = []
        if "messages" in rec:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{where}: 'messages' examples need a tokenizer with a chat_template; this one has none")
            for text, sup in chat_segments(_validate_messages(rec, where), tokenizer, where):
                seg = _ids(tokenizer, text)
                ids_list += seg
                lab_list += seg if sup else [IGNORE_INDEX] * len(seg)
        else:
            for key in ("prompt", "completion"):
                if key not in rec:
                    raise DataError(f"{where}: missing the key {key!r} (has {sorted(rec)}); expected one of {', '.join(FORMATS)}")
            prompt = _prompt_ids(tokenizer, _require_str(rec, "prompt", where))
            completion = _ids(tokenizer, _require_str(rec, "completion", where))
            eos = getattr(tokenizer, "eos_token_id", None)
            if add_eos and eos is not None and (not completion or completion[-1] != eos):
                completion.append(eos)
            ids_list = prompt + completion
            lab_list = [IGNORE_INDEX] * len(prompt) + completion
        ids = torch.tensor(ids_list, dtype=torch.long)
        labels = torch.tensor(lab_list, dtype=torch.long)
    else:
        raise DataError(f"{where}: unrecognized example with keys {sorted(rec)}; expected one of {', '.join(FORMATS)}")
    total = ids.numel()
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    ex = Example(ids, labels, where)
    if ex.num_supervised == 0:
        hint = f" after truncation to max_length={max_length} (the example has {total} tokens)" if max_length and total > max_length else ""
        raise DataError(f"{where}: no supervised (completion/assistant) tokens{hint}; nothing to learn from it")
    return ex


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized examples; ``ds[i]`` is ``{"input_ids": (T,), "labels": (T,)}`` int64 tensors."""

    def __init__(self, examples: Sequence[Example]) -> None:
        if not examples:
            raise DataError("the dataset holds no examples")
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}

    @property
    def num_tokens(self) -> int:
        return sum(ex.input_ids.numel() for ex in self.examples)

    @property
    def num_supervised(self) -> int:
        return sum(ex.num_supervised for ex in self.examples)

    def max_token_id(self) -> int:
        return max(int(ex.input_ids.max()) for ex in self.examples if ex.input_ids.numel())


def build_dataset(
    source: str | Path | SFTDataset | torch.utils.data.Dataset | Iterable[Mapping[str, Any]],
    tokenizer: Any | None = None,
    max_length: int | None = None,
    add_eos: bool = True,
) -> SFTDataset:
    """Tokenize every example up front, so bad data fails before training starts.

    Args:
        source: a ``.jsonl`` path, a list of dicts, a torch Dataset of dicts, or an SFTDataset
            (returned as is).
        tokenizer: HF tokenizer, needed for text examples.
        max_length: truncate each example to this many tokens.
    Raises:
        DataError: naming the file:line (or example index) and the problem.
    """
    if isinstance(source, SFTDataset):
        return source
    if isinstance(source, (str, Path)):
        records = _read_jsonl(Path(source))
    elif isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        records = [(f"example {i}", source[i]) for i in range(len(source))]  # type: ignore[arg-type]
    elif isinstance(source, Iterable) and not isinstance(source, Mapping):
        records = [(f"example {i}", rec) for i, rec in enumerate(source)]
    else:
        raise DataError(f"unsupported data source of type {type(source).__name__}; pass a .jsonl path, a list of dicts or a torch Dataset")
    if not records:
        raise DataError("the data source holds no examples")
    for where, rec in records:
        if not isinstance(rec, Mapping):
            raise DataError(f"{where}: expected a dict, got {type(rec).__name__}")
    return SFTDataset([tokenize_example(rec, tokenizer, max_length, where, add_eos) for where, rec in records])


def pad_token_id_for(tokenizer: Any | None) -> int:
    """The pad id: the tokenizer's pad token, else its EOS, else 0 (padded positions are masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(tid, list):  # some configs list several EOS ids
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return 0


class PadCollator:
    """Right-pads a list of examples into a batch.

    Returns ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}`` with T the
    longest example; padded positions get ``pad_token_id`` / mask 0 / label -100.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        seqs = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in examples]
        T = max(s.numel() for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ex, s) in enumerate(zip(examples, seqs)):
            n = s.numel()
            input_ids[b, :n] = s
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.as_tensor(ex["labels"], dtype=torch.long) if "labels" in ex else s
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
