"""Incremental detokenisation of generated tokens, with stop strings.

Decoding the whole output every step costs O(length) per token, and decoding each new token on
its own gives wrong text: sentencepiece decoders drop the leading space of a sequence's first
token, and a character whose bytes are split over several tokens decodes to U+FFFD until its last
byte arrives. So each step decodes a short window instead: the tokens of the previous emission
(as context) plus the new ones, and emits the part of the window's text not accounted for yet.
This is the technique of vLLM's prefix/read offsets and of `tokenizers.decoders.DecodeStream`;
it is done here because DecodeStream raises on some invalid byte sequences (the text of a window
stops being a prefix of its extension) and lets its window grow without bound on others.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context for the first output token, like vLLM's initial prefix offset.
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes, so moving a context window that starts inside a character
# back by 3 tokens reaches the character's first byte.
_MAX_CONTINUATION_TOKENS = 3
# Tokens held back waiting for the rest of a character before they are emitted anyway (as U+FFFD).
# Only invalid byte sequences wait this long; the bound keeps the window, and so each step, small.
_MAX_PENDING_TOKENS = 16

# Per tokenizer and skip_special_tokens: the length of each token's text decoded alone, which is the
# context a step usually leaves for the next one (a window of its one new token). Asked for every generated
# token, answered once per token id (at most the vocabulary's size of small ints).
_LENGTHS_ALONE: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[bool, dict[int, int]]] = (
    weakref.WeakKeyDictionary())


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text, one step at a time.

    The text equals `tokenizer.decode(prompt + output)` minus `tokenizer.decode(prompt)` (as
    decoded without `clean_up_tokenization_spaces`) whenever the output is valid UTF-8 and the
    prompt ends with a whole character; each step costs O(new tokens + longest stop string),
    never O(sequence length).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        """`prompt_token_ids` gives the context the first output token is decoded in (only its last
        few tokens are read); pass [] to get exactly `tokenizer.decode(output)`.

        `spaces_between_special_tokens` is accepted for parity with the sampling parameters of
        the API: only slow (Python) tokenizers implement it, and fast tokenizers' `decode` ignores
        it, so it cannot change the text here.
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError("IncrementalDetokenizer needs a fast (tokenizers-backed) tokenizer")
        if stop and not all(stop):
            raise ValueError("stop strings must be non-empty")
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._lengths_alone = _LENGTHS_ALONE.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})
        self._skipped_ids = (
            frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
            if skip_special_tokens
            else frozenset()
        )
        self._stop = tuple(stop or ())
        self._include_stop = include_stop_str_in_output
        # A stop string completed by new text starts at most this many characters before it.
        self._lookback = max(max(map(len, self._stop), default=0) - 1, 0)
        # Unless stop strings stay in the output, a stream must not show what may become the
        # beginning of one: that text would be removed once the stop string completes.
        self._hold_back = 0 if include_stop_str_in_output else self._lookback

        # The window: _window[:_read] is context that was already turned into text; the first
        # _done characters of decode(_window) are accounted for (prompt or emitted output).
        self._window = self._prompt_context(prompt_token_ids)
        self._read = len(self._window)
        self._done = len(self._decode(self._window))

        # Output text, kept in pieces so that appending costs O(new text): _sent was returned by
        # get_next_output_text(delta=True) and never changes; _unsent is the rest.
        self._sent: list[str] = []
        self._unsent: list[str] = []
        self._len = 0
        self._stop_str: str | None = None
        self._finished = False

    @property
    def output_text(self) -> str:
        """The whole output text so far; O(length), so streaming should use deltas instead."""
        sent, unsent = "".join(self._sent), "".join(self._unsent)
        self._sent, self._unsent = [sent] if sent else [], [unsent] if unsent else []
        return sent + unsent

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends generated tokens and returns the stop string they complete, if any.

        ``check_stop=False`` (while a request is still under ``min_tokens``) only appends the text.

        On a match the text is cut at the start of the stop string (or after it when
        `include_stop_str_in_output`) and the caller must finish the request with finish_reason
        "stop". With several stop strings, the one completed first wins, which does not depend
        on how tokens are grouped into calls.
        """
        if self._finished or self._stop_str is not None:
            raise RuntimeError("update() called after the request finished")
        new_text = ""
        for token_id in new_token_ids:   # usually one: a loop, not a generator joined
            if self._has_text(token_id):
                new_text += self._step(token_id)
        if not new_text:
            return None
        lookback = self._last_chars(self._lookback)
        searched, searched_from = lookback + new_text, self._len - len(lookback)
        self._append(new_text)
        if not check_stop:
            return None
        matches = [(i + len(s), i, s) for s in self._stop if (i := searched.find(s)) >= 0]
        if not matches:
            return None
        end, start, stop_str = min(matches)
        self._truncate(searched_from + (end if self._include_stop else start))
        self._stop_str = stop_str
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for a streamed response: only what was not returned before when `delta`, else all.

        While not finished, the last len(longest stop string) - 1 characters are held back (unless
        stop strings are kept in the output). The first call with `finished` also emits any bytes
        of an incomplete last character as U+FFFD, as `tokenizer.decode` would, unless a stop
        string ended the request; update() may not be called after it.
        """
        if finished and not self._finished:
            self._finished = True
            if self._stop_str is None:
                self._append(self._flush())
        hold_back = 0 if finished else self._hold_back
        if not delta:
            text = self.output_text
            return text[: max(len(text) - hold_back, 0)]
        unsent = "".join(self._unsent)
        cut = max(len(unsent) - hold_back, 0)
        self._unsent = [unsent[cut:]] if cut < len(unsent) else []
        if cut:
            self._sent.append(unsent[:cut])
        return unsent[:cut]

    def _has_text(self, token_id: int) -> bool:
        """Whether decode() keeps the token, rather than dropping it as a skipped special token or
        an id past the vocabulary (a model's padded embedding rows).

        Dropping such tokens up front keeps them out of the window, so that a run of them can
        neither grow it nor leave it without a real token as context (without one, a sentencepiece
        decoder would drop the next token's leading space).
        """
        return token_id not in self._skipped_ids and self._backend.id_to_token(token_id) is not None

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt tokens, starting at a character boundary.

        A window starting inside a character would decode differently once more bytes follow
        (byte-fallback decoders turn a whole run of byte tokens into U+FFFD if any byte is invalid).
        """
        tail: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if self._has_text(token_id):
                tail.append(token_id)
                if len(tail) == _PROMPT_CONTEXT_TOKENS + _MAX_CONTINUATION_TOKENS:
                    break
        tail.reverse()
        start = max(len(tail) - _PROMPT_CONTEXT_TOKENS, 0)
        while start > 0 and self._decode(tail[start:]).startswith(_REPLACEMENT_CHAR):
            start -= 1
        return tail[start:]

    def _step(self, token_id: int) -> str:
        """Adds one token to the window and returns the text it completes.

        Stepping token by token makes the text independent of how tokens are grouped into
        update() calls, and limits the window to the tokens of the previous emission and of one
        character.
        """
        self._window.append(token_id)
        text = self._decode(self._window)
        pending = len(self._window) - self._read
        if text.endswith(_REPLACEMENT_CHAR) and pending <= _MAX_PENDING_TOKENS:
            # The token may end inside a character whose other bytes are still to come.
            return ""
        # Slide: the tokens added since the last slide become the context of the next step. They
        # start where the text was complete, so they decode the same alone as after the context.
        new_text = text[self._done :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        if self._read == 1:
            token = self._window[0]
            done = self._lengths_alone.get(token)
            if done is None:
                done = self._lengths_alone[token] = len(self._decode(self._window))
            self._done = done
        else:
            self._done = len(self._decode(self._window))
        return new_text

    def _flush(self) -> str:
        """The U+FFFD of a last character that will never be completed."""
        text = self._decode(self._window)
        tail = text[self._done :]
        self._done = len(text)
        return tail

    def _append(self, text: str) -> None:
        if text:
            self._unsent.append(text)
            self._len += len(text)

    def _last_chars(self, n: int) -> str:
        """The last n characters of the output text, in O(n)."""
        pieces: list[str] = []
        size = 0
        for piece in itertools.chain(reversed(self._unsent), reversed(self._sent)):
            if size >= n:
                break
            piece = piece[-(n - size) :]
            pieces.append(piece)
            size += len(piece)
        return "".join(reversed(pieces))

    def _truncate(self, length: int) -> None:
        """Cuts the output text to `length` characters.

        The cut is at most the new text plus the hold-back before it, which was never sent.
        """
        unsent = "".join(self._unsent)
        keep = len(unsent) - (self._len - length)
        self._unsent = [unsent[:keep]] if keep else []
        self._len = length
