"""``llama-cpp chat``: a conversation with the model through its chat template."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Generator, Iterator

from llama_cpp import ContextOverflowError, Llama
from llama_cpp.commands.common import (
    Subcommands,
    add_command,
    add_model_arguments,
    add_sampling_arguments,
    load_progress,
    model_options,
)
from llama_cpp.config import resolve_config
from llama_cpp.unified import family_settings

HELP = "/reset clears the conversation; /exit, Ctrl-D or Ctrl-C leaves."


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "chat",
        summary="chat with the model (its chat template, the conversation kept)",
        description="""
            Talk with the model: each line you type is a user message, and the answer streams
            back. The whole conversation goes to the model each turn, rendered by its chat
            template (or --chat-template / --chat-format). /reset clears the conversation;
            /exit, Ctrl-D or Ctrl-C leaves (Ctrl-C while it answers stops the answer).

            When stdin is not a terminal, each line of it is a message (commands included),
            and only the answers are printed, one a line.""",
        examples="""
            llama-cpp chat -m model.gguf
            llama-cpp chat -m model.gguf --system "Answer in one sentence." --temperature 0.2
            printf 'Hi!\\n/reset\\nName a color.\\n' | llama-cpp chat -m model.gguf --temperature 0
        """,
    )
    add_model_arguments(parser, n_ctx=4096)
    add_sampling_arguments(parser, max_tokens=512)
    parser.add_argument("--system", default=None, help="a system message that starts the conversation")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template instead of the model's")
    parser.add_argument(
        "--chat-format", default=None, help='a built-in chat format ("chatml", "llama-2", ...)'
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with load_progress(args.model) as progress:
        config = resolve_config(
            "Llama",
            None,
            {
                "chat_template": args.chat_template,
                "chat_format": args.chat_format,
                "progress_callback": progress,
                **model_options(args),
            },
        )
        # A GGUF without a chat template gets its family's (as UnifiedLLM and the server do).
        _, config = family_settings(args.model, config)
        llm = Llama(args.model, config=config)
    with llm:
        if interactive:
            _enable_line_editing()
            print(f"Chatting with {llm.model.description()}. {HELP}", file=sys.stderr)
        Conversation(llm, args).run(_lines(interactive))
    return 0


class Conversation:
    """The messages so far, and a turn: the user's line in, the streamed answer out."""

    def __init__(self, llm: Llama, args: argparse.Namespace) -> None:
        self._llm = llm
        self._args = args
        self._start: list[dict[str, str]] = []
        if args.system:
            self._start.append({"role": "system", "content": args.system})
        self.messages = list(self._start)

    def run(self, lines: Iterator[str]) -> None:
        """Answer each line until /exit or the end of the input."""
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                return
            if text == "/reset":
                self.messages = list(self._start)
                print("(conversation cleared)", file=sys.stderr)
                continue
            self.turn(text)

    def turn(self, text: str) -> None:
        """Send ``text`` with the conversation so far and stream the answer to stdout."""
        args = self._args
        self.messages.append({"role": "user", "content": text})
        answer: list[str] = []
        try:
            stream = self._llm.create_chat_completion(
                self.messages,
                stream=True,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                repeat_penalty=args.repeat_penalty,
                seed=args.seed,
            )
            try:
                for chunk in stream:
                    piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                    if piece:
                        answer.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            finally:
                if isinstance(stream, Generator):  # ends the native stream now, not when collected
                    stream.close()
        except KeyboardInterrupt:  # stops this answer, not the chat
            pass
        except ContextOverflowError as error:
            self.messages.pop()
            print(f"llama-cpp: {error}; /reset to start over", file=sys.stderr)
            return
        sys.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(answer)})


def _lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


def _enable_line_editing() -> None:
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (input() then has history and editing)
