"""The `mlx-smolvlm` command: generate, chat, convert, export-onnx.

Serving is the router's: `smolvlm-router --model PATH_OR_HUB_ID`.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .chat import ChatSession
from .generate import GenerationResponse, stream_generate
from .image_processing import load_image
from .quantize import DEFAULT_GROUP_SIZE, DEFAULT_RECIPE
from .sample import make_repetition_penalty, make_sampler

MMPROJ_HELP = "the vision mmproj GGUF of a GGUF --model / --hf-path (text only without it)"
# Errors a user can cause with their input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)

DESCRIPTION = (
    "SmolVLM2 on MLX: answer a prompt about images or a video, chat, or convert a checkpoint. "
    "Serving over HTTP is smolvlm-router's job (smolvlm-router --model PATH_OR_HUB_ID)."
)
MODEL_HELP = (
    "a local checkpoint directory, a llama.cpp GGUF file, or a Hugging Face Hub id (downloaded "
    "on first use, then read from the Hugging Face cache)"
)
CHAT_HELP = """commands:
  /image PATH_OR_URL  attach an image to your next message (checked at once)
  /help               list these commands
  /quit, /exit        end the chat (so does Ctrl-D)"""


def add_offline_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never contact the Hugging Face Hub: use its cache only (sets HF_HUB_OFFLINE=1)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--temp", type=float, default=0.0, help="temperature, 0 is greedy (default: %(default)s)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="keep the k likeliest tokens, 0 keeps all (default: %(default)s)",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="keep tokens at least this likely relative to the top one (default: %(default)s)",
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, help="above 1 discourages repeats"
    )
    parser.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
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


def check_sampling_options(options: dict[str, Any]) -> None:
    """Refuse sampling options that generation would refuse, before the model loads.

    Args:
        options: From `sampling_options`.

    Raises:
        ValueError: An option is out of range (the message names it).
    """
    if options["max_tokens"] < 1:
        raise ValueError(f"max_tokens must be >= 1, got {options['max_tokens']}")
    make_sampler(options["temperature"], options["top_p"], options["top_k"], options["min_p"])
    if options["repetition_penalty"] is not None:
        make_repetition_penalty(options["repetition_penalty"])


def format_stats(response: GenerationResponse) -> str:
    return (
        f"[prompt: {response.prompt_tokens} tokens ({response.cached_tokens} cached), "
        f"{response.prompt_tps:.1f} tok/s | generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.1f} tok/s | peak memory: {response.peak_memory:.2f} GB | "
        f"finish: {response.finish_reason}]"
    )


def print_stream(responses: Any) -> GenerationResponse:
    """Print the answer as it streams, end it with a newline, then the stats line on stderr."""
    ends_line = False  # an empty answer is an empty line
    for response in responses:
        if response.text:
            print(response.text, end="", flush=True)
            ends_line = response.text.endswith("\n")
    if not ends_line:
        print(flush=True)
    print(format_stats(response), file=sys.stderr)
    return response


def run_generate(args: argparse.Namespace) -> int:
    from .load import load

    # Every argument is checked before the model loads, which can take a while.
    options = sampling_options(args)
    check_sampling_options(options)
    images = [load_image(source) for source in args.image]
    if args.video and not Path(args.video).is_file():
        raise FileNotFoundError(f"Video file not found: {args.video}")
    model, processor = load(args.model, mmproj=args.mmproj)
    content = [{"type": "image"} for _ in images]
    if args.video:
        content.append({"type": "video"})
    messages = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    print_stream(
        stream_generate(model, processor, messages, images=images, video=args.video, **options)
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .load import load

    options = sampling_options(args)
    check_sampling_options(options)
    model, processor = load(args.model, mmproj=args.mmproj)
    session = ChatSession(model, processor)
    images: list = []
    print("Chat with the model: '/image PATH' attaches an image, '/help' lists the commands.")
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            print(CHAT_HELP)
        elif command == "/image":
            images = attach_image(images, argument.strip())
        elif command.startswith("/"):
            print(f"error: unknown command {command} (/help lists them)", file=sys.stderr)
        else:
            try:
                print_stream(session.ask(line, images, **options))
            except USER_ERRORS as err:
                print(f"error: {err}", file=sys.stderr)
            images = []


def attach_image(images: list, source: str) -> list:
    """``images`` plus the image at ``source``, loaded now so that a bad path or URL is
    reported at once (and the next message is not lost to it); on error, ``images`` as it was."""
    if not source:
        print("error: /image needs a path or URL", file=sys.stderr)
        return images
    try:
        images = [*images, load_image(source)]
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return images
    print(f"[{len(images)} image(s) attached to your next message]")
    return images


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
        mmproj=args.mmproj,
    )
    return 0


def run_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    export_onnx(
        args.hf_path, args.onnx_path, dtype=args.dtype, quantize=args.quantize, force=args.force
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The options of ``mlx-smolvlm`` and its commands."""
    parser = argparse.ArgumentParser(prog="mlx-smolvlm", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="answer one prompt, streaming the text",
        description="Answer one prompt about images or a video, streaming the text to stdout "
        "and one stats line to stderr.",
    )
    generate.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="an image: a path, an http(s) URL or a data URL (repeatable)",
    )
    generate.add_argument("--video", default=None, metavar="PATH", help="a video file")
    generate.add_argument("--prompt", required=True, help="the question or instruction")
    generate.add_argument("--mmproj", default=None, metavar="PATH", help=MMPROJ_HELP)
    add_sampling_args(generate)
    add_offline_arg(generate)
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser(
        "chat",
        help="an interactive multi-turn chat",
        description="An interactive chat that keeps the conversation's cache between turns.",
        epilog=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    chat.add_argument("--mmproj", default=None, metavar="PATH", help=MMPROJ_HELP)
    add_sampling_args(chat)
    add_offline_arg(chat)
    chat.set_defaults(run=run_chat)

    convert = commands.add_parser(
        "convert",
        help="export a Hugging Face checkpoint to MLX (quantized or not)",
        description="Export a Hugging Face SmolVLM checkpoint for mlx-vlm and MLX Swift, "
        "optionally quantized (vision tower and decoder).",
    )
    convert.add_argument("--hf-path", required=True, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    convert.add_argument("--mlx-path", required=True, metavar="DIR", help="the export directory")
    convert.add_argument("--mmproj", default=None, metavar="PATH", help=MMPROJ_HELP)
    convert.add_argument("-q", "--quantize", action="store_true", help="quantize (affine)")
    convert.add_argument(
        "--q-bits", type=int, default=4, help="4 or 8 bits per weight (default: %(default)s)"
    )
    convert.add_argument(
        "--q-group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help="32, 64 or 128 (default: %(default)s)",
    )
    convert.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help="calibrated: GPTQ on shipped text and image, 8-bit embeddings and head; "
        "uniform: round to nearest, fast; mixed: 8-bit vision tower (default: %(default)s)",
    )
    convert.add_argument(
        "--skip-vision", action="store_true", help="leave the vision tower unquantized"
    )
    convert.add_argument(
        "--dtype",
        default=None,
        help="float16, bfloat16 or float32 (default: the source's dtype)",
    )
    convert.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path")
    add_offline_arg(convert)
    convert.set_defaults(run=run_convert)

    export_onnx = commands.add_parser(
        "export-onnx",
        help="export a Hugging Face checkpoint to ONNX (ONNX Runtime, transformers.js)",
        description="Export a Hugging Face SmolVLM checkpoint to ONNX in the layout Hugging Face "
        "publishes (onnx/vision_encoder, embed_tokens, decoder_model_merged), with optional fp16 "
        "and quantized variants beside the fp32 graphs. Needs the 'onnx' extra.",
    )
    export_onnx.add_argument("--hf-path", required=True, metavar="PATH_OR_HUB_ID", help=MODEL_HELP)
    export_onnx.add_argument(
        "--onnx-path", required=True, metavar="DIR", help="the export directory"
    )
    export_onnx.add_argument(
        "--dtype", default="fp32", help="fp32, or fp16 to add *_fp16.onnx (default: %(default)s)"
    )
    export_onnx.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="VARIANT",
        help="add a variant: int8, q4 or q4f16 (repeatable)",
    )
    export_onnx.add_argument("--force", action="store_true", help="replace a non-empty --onnx-path")
    add_offline_arg(export_onnx)
    export_onnx.set_defaults(run=run_export_onnx)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status: 0, 1 for bad input (one ``error:`` line), 130 on Ctrl-C.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by `load.hub_offline` at download time
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
