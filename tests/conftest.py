"""Fixtures shared by the command-line tests."""
import pytest

import generate


@pytest.fixture
def interactive_session(monkeypatch):
    """interactive_session(lines) -> prompts: input() answers each line in turn, then EOFError (the end of
    the terminal's input); `prompts` collects the ids of every prompt generate.stream is given."""
    def start(lines: list[str]) -> list[list[int]]:
        typed, prompts, real = iter(lines), [], generate.stream

        def fake_input(prompt=""):
            try:
                return next(typed)
            except StopIteration:
                raise EOFError from None
        monkeypatch.setattr("builtins.input", fake_input)
        monkeypatch.setattr(generate, "stream",
                            lambda model, ids, *a, **k: prompts.append(ids) or real(model, ids, *a, **k))
        return prompts
    return start
