"""Stop sequences in streamed text, in time linear in the text (OpenAI leaves them out).

Each stop string gets a Knuth-Morris-Pratt automaton: its state is the length of the longest
prefix of the stop string that the text streamed so far ends with. Feeding a character costs
amortized O(1) per stop string, so a token's work is bounded by its own text, never by the
length of the stop strings or of the text before it. The text that may still turn out to be
the start of a stop sequence (the largest state) is held back; the rest is sent.
"""

from __future__ import annotations


def _failure(pattern: str) -> list[int]:
    """failure[i]: the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


class _Automaton:
    __slots__ = ("pattern", "failure", "state")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.failure = _failure(pattern)
        self.state = 0  # matched prefix length; == len(pattern) means a full match

    def feed(self, char: str) -> bool:
        """Advances over one character; True when the stop string has just been completed."""
        pattern, state = self.pattern, self.state
        if state == len(pattern):
            state = self.failure[state - 1]
        while state and pattern[state] != char:
            state = self.failure[state - 1]
        if pattern[state] == char:
            state += 1
        self.state = state
        return state == len(pattern)


class StopMatcher:
    """Splits a stream of text pieces into what can be sent now and what must wait, and
    finds where the first stop sequence starts (the text is cut there)."""

    def __init__(self, stops: list[str]) -> None:
        self._automata = [_Automaton(s) for s in stops if s]
        self._held = ""  # text received but not yet sent: a possible stop-sequence start
        self.is_stopped = False

    def push(self, text: str, is_last: bool = False) -> str:
        """Takes the next piece of text; returns the part that is safe to send. After a stop
        sequence, or with `is_last`, everything before the stop is released."""
        if self.is_stopped:
            return ""
        if not self._automata:
            return text
        held = self._held + text
        base = len(self._held)
        for offset, char in enumerate(text):
            for automaton in self._automata:
                if automaton.feed(char):
                    self.is_stopped = True
                    end = base + offset + 1
                    self._held = ""
                    return held[: end - len(automaton.pattern)]
        if is_last:
            self._held = ""
            return held
        keep = max(a.state for a in self._automata)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]


def trim_at_stop(text: str, stops: list[str]) -> str:
    """The text before the earliest stop sequence in it (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return text[: min(ends)] if ends else text
