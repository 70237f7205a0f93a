"""The `mlx-smolvlm` command: generate, chat, convert.

Serving is the router's: `smolvlm-router --model PATH_OR_HUB_ID`.
"""

import argparse
import logging
import sys
from typing import Any

from .chat import ChatSession
from .generate import GenerationResponse, stream_generate

# Errors a user can cause with their input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def format_stats(response: GenerationResponse) -> str:
    return (
        f"[prompt: {response.prompt_tokens} tokens ({response.cached_tokens} cached), "
        f"{response.prompt_tps:.1f} tok/s | generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.1f} tok/s | peak memory: {response.peak_memory:.2f} GB | "
        f"finish: {response.finish_reason}]"
    )


def print_stream(responses: Any) -> GenerationResponse:
    for response in responses:
        print(response.text, end="", flush=True)
    print()
    print(format_stats(response), file=sys.stderr)
    return response


def run_generate(args: argparse.Namespace) -> int:
    from .load import load

    model, processor = load(args.model)
    content = [{"type": "image"} for _ in args.image]
    if args.video:
        content.append({"type": "video"})
    messages = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    print_stream(
        stream_generate(
            model,
            processor,
            messages,
            images=args.image,
            video=args.video,
            **sampling_options(args),
        )
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .load import load

    model, processor = load(args.model)
    session = ChatSession(model, processor)
    images: list[str] = []
    print(
        "Chat with the model. '/image PATH' attaches an image to your next message; '/quit' ends."
    )
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/image "):
            images.append(line.removeprefix("/image ").strip())
            print(f"[{len(images)} image(s) attached to your next message]")
            continue
        if not line:
            continue
        try:
            print_stream(session.ask(line, images, **sampling_options(args)))
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
        images = []


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        recipe=args.recipe,
        skip_vision=args.skip_vision,
        dtype=args.dtype,
        force=args.force,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-smolvlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer one prompt, streaming the text")
    generate.add_argument("--model", required=True, help="a local checkpoint or a hub id")
    generate.add_argument("--image", action="append", default=[], help="a path or URL (repeatable)")
    generate.add_argument("--video", default=None, help="a video file")
    generate.add_argument("--prompt", required=True)
    add_sampling_args(generate)
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="an interactive multi-turn chat")
    chat.add_argument("--model", required=True, help="a local checkpoint or a hub id")
    add_sampling_args(chat)
    chat.set_defaults(run=run_chat)

    convert = commands.add_parser("convert", help="export a Hugging Face checkpoint to MLX")
    convert.add_argument("--hf-path", required=True, help="a local checkpoint or a hub id")
    convert.add_argument("--mlx-path", required=True, help="the export directory")
    convert.add_argument("-q", "--quantize", action="store_true", help="quantize (affine)")
    convert.add_argument("--q-bits", type=int, default=4, help="4 or 8")
    convert.add_argument("--q-group-size", type=int, default=64, help="32, 64 or 128")
    convert.add_argument("--recipe", default="uniform", help="uniform, mixed or calibrated")
    convert.add_argument(
        "--skip-vision", action="store_true", help="leave the vision tower unquantized"
    )
    convert.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    convert.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path")
    convert.set_defaults(run=run_convert)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; defaults to `sys.argv[1:]`.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
