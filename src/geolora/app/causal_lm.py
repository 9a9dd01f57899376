"""Supervised fine-tuning data for causal LMs: conversations, chat templates, response-only loss.

An example is a conversation, a list of ``{"role", "content"}`` messages ending with the
assistant's answer: a ``messages`` column as it is, or a ``prompt``/``response`` pair as
``[user: prompt, assistant: response]``. With no dataset, the embedded Rotten Tomatoes sentences
become an instruction task (:func:`sentiment_instructions`) whose answers are the labels
``positive``/``negative``.

Tokens. With the tokenizer's chat template, the rendered text of each prefix of the conversation
is cut into pieces: before assistant turn ``i`` the text up to ``template(messages[:i],
add_generation_prompt=True)`` (not trained), then the turn itself up to ``template(messages[:i +
1])`` (trained, including its end-of-turn marker). Without a template (or with
``chat_template=False``) a pair becomes ``prompt`` + (``"\\n"`` unless the prompt ends in white
space) + ``response`` + EOS, and only the response and EOS are trained. Each piece is tokenized
on its own, so the prompt the model is trained on is exactly the prompt it gets at generation.
Labels are ``-100`` (ignored by the loss) on untrained tokens; examples longer than
``max_length`` tokens are cut at the end, and those left without a trained token are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..data import load_rotten_tomatoes
from .batches import pad_rows
from .tables import DataError, column, data_file, read_rows, shuffled_split

__all__ = [
    "ChatTask",
    "EncodedChats",
    "encode_chats",
    "load_chat_task",
    "prompt_ids",
    "sentiment_instructions",
    "uses_template",
]

IGNORE = -100
SENTIMENT_LABELS = ["negative", "positive"]
SENTIMENT_PROMPT = (
    "Is the sentiment of this movie review positive or negative?\n"
    "Review: {text}\nAnswer with one word: positive or negative."
)

Message = dict[str, str]


@dataclass
class ChatTask:
    """Training and held-out conversations; ``source`` says where they came from."""

    train: list[list[Message]]
    eval: list[list[Message]]
    source: str


def sentiment_instructions(
    eval_fraction: float, seed: int, limit: int | None
) -> tuple[list[list[Message]], list[list[Message]]]:
    """The embedded Rotten Tomatoes sentences as ``[user: SENTIMENT_PROMPT, assistant: label]``
    conversations, split as :func:`geolora.data.load_rotten_tomatoes` splits them."""
    splits = load_rotten_tomatoes(test_fraction=eval_fraction, seed=seed, limit=limit)
    return tuple(  # type: ignore[return-value]
        [
            _pair(SENTIMENT_PROMPT.format(text=text), SENTIMENT_LABELS[label])
            for text, label in zip(split.texts, split.labels)
        ]
        for split in splits
    )


def _pair(prompt: str, response: str) -> list[Message]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _conversation(value: Any, source: str, number: int) -> list[Message]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{source} example {number}: messages are not JSON: {err.msg}."
            ) from err
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok or not value:
        raise DataError(
            f"{source} example {number}: messages must be a list of "
            '{"role": ..., "content": ...} objects.'
        )
    if value[-1]["role"] != "assistant":
        raise DataError(
            f"{source} example {number}: the last message must be the assistant's answer "
            f"(role 'assistant'), found role {value[-1]['role']!r}."
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_chat_task(
    dataset: str | None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    eval_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> ChatTask:
    """Conversations from a CSV/TSV/JSONL/JSON file (a ``messages_column``, else
    ``prompt_column`` and ``response_column``), or the embedded sentiment task for ``None``,
    shuffled with ``seed`` (at most ``limit`` kept) and split into training and held-out sets."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must lie in (0, 1), got {eval_fraction}.")
    if dataset is None or dataset == "rotten_tomatoes":
        train, held = sentiment_instructions(eval_fraction, seed, limit)
        return ChatTask(train, held, "Rotten Tomatoes sentences as instructions (embedded)")
    path = data_file(dataset)
    if path is None:
        raise DataError(
            f"{dataset!r} is not a local file; --task causal-lm reads .csv, .tsv, .jsonl or "
            ".json files with prompt/response columns or a messages column."
        )
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no examples.")
    source = str(path)
    if messages_column in rows[0]:
        values = column(rows, messages_column, source, "--messages-column")
        chats = [_conversation(v, source, i) for i, v in enumerate(values, start=1)]
    else:
        prompts = column(rows, prompt_column, source, "--prompt-column (or --messages-column)")
        responses = column(rows, response_column, source, "--response-column")
        chats = [_pair(str(p), str(r)) for p, r in zip(prompts, responses)]
    train, held = shuffled_split(chats, eval_fraction, seed, limit, source)
    return ChatTask(train, held, source)


# --- tokens --------------------------------------------------------------------------------
def uses_template(tokenizer: Any, chat_template: bool) -> bool:
    """Whether conversations are rendered with the tokenizer's chat template."""
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _template_pieces(tokenizer: Any, messages: list[Message]) -> list[tuple[str, bool]]:
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError(
                "The tokenizer's chat template does not render a conversation's beginning as the "
                "beginning of the whole, so the answer tokens cannot be told apart; pass "
                "--no-chat-template to use plain prompt + response text."
            )
        pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    return pieces


def _token_pieces(
    tokenizer: Any, messages: list[Message], chat_template: bool
) -> list[tuple[list[int], bool]]:
    """The conversation as token pieces ``(ids, trained)``, per the module docstring."""
    if uses_template(tokenizer, chat_template):
        return [
            (tokenizer(text, add_special_tokens=False)["input_ids"], trained)
            for text, trained in _template_pieces(tokenizer, messages)
            if text
        ]
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has no EOS token, so answers could not end: set one.")
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return [
        (prompt_ids(tokenizer, messages[:-1], False), False),
        (answer + [tokenizer.eos_token_id], True),
    ]


def prompt_ids(tokenizer: Any, messages: list[Message], chat_template: bool = True) -> list[int]:
    """The tokens of the generation prompt after ``messages`` (the conversation before the
    answer): the same text the model is trained on before that answer."""
    if uses_template(tokenizer, chat_template):
        text = _render(tokenizer, messages, True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise DataError(
            "Multi-turn messages need a tokenizer with a chat template; this one has none "
            "(or --no-chat-template is set): use prompt/response columns."
        )
    prompt = messages[0]["content"]
    if prompt and not prompt[-1].isspace():
        prompt += "\n"
    return tokenizer(prompt)["input_ids"]


@dataclass
class EncodedChats:
    """Token ids and labels (``-100`` on untrained tokens) per conversation, unpadded."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """``input_ids`` (right-padded), ``attention_mask`` and ``labels`` (padded with -100)."""
        ids = [self.input_ids[i] for i in indices]
        return {
            "input_ids": pad_rows(ids, self.pad_id),
            "attention_mask": pad_rows([[1] * len(row) for row in ids], 0),
            "labels": pad_rows([self.labels[i] for i in indices], IGNORE),
        }


def encode_chats(
    tokenizer: Any, chats: list[list[Message]], max_length: int, chat_template: bool = True
) -> EncodedChats:
    """Tokenize every conversation (module docstring); cut at ``max_length`` tokens."""
    all_ids, all_labels, dropped = [], [], 0
    for chat in chats:
        ids, labels = [], []
        for piece, trained in _token_pieces(tokenizer, chat, chat_template):
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    if not all_ids:
        raise DataError(
            f"Every example is longer than --max-length {max_length} tokens before its answer "
            "starts: raise --max-length."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedChats(all_ids, all_labels, pad, dropped)
