"""`pagedllm generate | chat | serve`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pagedllm
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.logger import LOG_LEVELS, STATS_LOGGER, configure_process_logging

logger = logging.getLogger("pagedllm")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)


def _params(args):
    from pagedllm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)


def cmd_generate(args) -> None:
    from pagedllm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    for out in llm.generate(args.prompt, _params(args)):
        print(out.outputs[0].text)


def cmd_chat(args) -> None:
    """An interactive chat that streams tokens to the terminal as they are generated."""
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.chat_utils import apply_chat_template_override
    from pagedllm.entrypoints.llm import LLM

    # The engine's periodic stats line would land in the middle of a streamed answer (both
    # go to the terminal): here it is a debug line.
    if args.log_level != "debug":
        logging.getLogger(STATS_LOGGER).setLevel(logging.WARNING)
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    apply_chat_template_override(engine.tokenizer, args.chat_template)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = LLM.encode_chat_with(engine.tokenizer, messages)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, None, _params(args), ids)
        reply = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                piece = out.outputs[0].delta_text
                reply += piece
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"pagedllm {pagedllm.__version__}")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="debug also prints the traceback of a start-up error")


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pagedllm {pagedllm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one or more prompts and print the text")
    gen.add_argument("prompt", nargs="+")
    chat = sub.add_parser("chat", help="interactive chat that streams tokens")
    chat.add_argument("--system", default=None, help="system message")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    for p in (gen, chat, serve):
        _common_args(p)
    for p in (chat, serve):
        p.add_argument("--chat-template", default=None,
                       help="a Jinja chat template (a file, or the template inline) used instead "
                       "of the model's own for every chat request")
    for p in (gen, chat):
        EngineArgs.add_cli_args(p)
        _sampling_args(p)
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="the model, as `vllm serve MODEL` takes it (same as --model)")
    EngineArgs.add_cli_args(serve)
    try:
        from pagedllm.entrypoints.openai.api_server import add_serve_args

        add_serve_args(serve)
    except ImportError:
        pass  # the server's dependencies are an extra: pip install pagedllm[serve]
    args = parser.parse_args(argv)
    if getattr(args, "model_tag", None) is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    configure_process_logging(args.log_level)
    try:
        if args.command == "generate":
            cmd_generate(args)
        elif args.command == "chat":
            cmd_chat(args)
        else:
            from pagedllm.entrypoints.openai.api_server import run_server

            run_server(args, started)
    except (OSError, ValueError) as exc:
        # Bad input (a model path or Hub id that is not there, no network, a port in use, a
        # flag value out of range): one line that says what to do, not a traceback.
        logger.debug("the traceback of the error below", exc_info=True)
        hint = "" if args.log_level == "debug" else " (--log-level debug shows the traceback)"
        message = " ".join(str(exc).split())  # one line, even from a multi-line message
        sys.exit(f"pagedllm {args.command}: error: {message}{hint}")


if __name__ == "__main__":
    main()
