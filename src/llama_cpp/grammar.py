"""GBNF grammars that constrain generation: :class:`LlamaGrammar`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llama_cpp.errors import GrammarError


@dataclass(frozen=True, slots=True)
class LlamaGrammar:
    """A GBNF grammar (llama.cpp's grammar format) and its start symbol.

    llama.cpp parses it against the model's vocabulary when a generation starts, with a fresh
    grammar state every time; a grammar it rejects raises :class:`GrammarError` with
    llama.cpp's reason. :meth:`Llama.check_grammar` checks one up front.
    """

    grammar: str
    root: str = "root"

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True, root: str = "root") -> LlamaGrammar:
        """A grammar from GBNF text (``verbose`` is accepted for llama-cpp-python compatibility).

        Raises:
            GrammarError: The text is empty.
        """
        del verbose
        if not grammar.strip():
            raise GrammarError("invalid grammar: the grammar is empty")
        return cls(grammar=grammar, root=root)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], verbose: bool = True, root: str = "root"
    ) -> LlamaGrammar:
        """A grammar from a ``.gbnf`` file (raises FileNotFoundError if there is none)."""
        return cls.from_string(Path(path).read_text(encoding="utf-8"), verbose, root)
