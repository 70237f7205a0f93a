"""Multi-turn chat that keeps the conversation's KV cache and image features between turns."""

from collections.abc import Iterator
from typing import Any

from .generate import (
    GenerationResponse,
    ImageFeatureCache,
    PromptCache,
    prepare_prompt,
    stream_generate,
)
from .image_processing import ImageInput
from .model import Model
from .processing import PreparedPrompt, Processor


class ChatSession:
    """A conversation with the model.

    The session keeps the exact token ids it has fed (its own answers included, as generated),
    so each turn's prompt extends the cached one and only the new tokens are prefilled.
    """

    def __init__(self, model: Model, processor: Processor):
        self.model = model
        self.processor = processor
        self.messages: list[dict] = []
        self.prompt = PreparedPrompt([])
        self.prompt_cache = PromptCache.for_model(model)
        self.feature_cache = ImageFeatureCache()

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )

    def ask(
        self, text: str, images: list[ImageInput] | None = None, **sampling: Any
    ) -> Iterator[GenerationResponse]:
        """Send one user turn and stream the answer; the answer joins the conversation.

        Args:
            text: The user's message.
            images: Images for this turn, shown before the text.
            **sampling: Options of `stream_generate` (max_tokens, temperature, ...).

        Raises:
            ValueError: Empty text, an image the processor rejects, or a full context. The
                conversation is left as it was before the call.
        """
        if not text.strip():
            raise ValueError("the message is empty")
        images = list(images or [])
        user = {
            "role": "user",
            "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}],
        }
        before = self._render(self.messages, add_generation_prompt=False)
        turn_text = self._render(self.messages + [user], add_generation_prompt=True)[len(before) :]
        prompt = self.prompt + prepare_prompt(self.processor, turn_text, images)

        pieces = []
        for response in stream_generate(
            self.model,
            self.processor,
            prompt,
            prompt_cache=self.prompt_cache,
            feature_cache=self.feature_cache,
            **sampling,
        ):
            pieces.append(response.text)
            yield response

        answer = "".join(pieces)
        assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        self.prompt = (
            prompt
            + PreparedPrompt(list(response.tokens))
            + self._closing(self.messages + [user], assistant, response.tokens)
        )
        self.messages += [user, assistant]

    def _closing(self, messages: list[dict], assistant: dict, tokens: list[int]) -> PreparedPrompt:
        """The template's text after an answer (end of utterance), less an EOS already generated."""
        opened = self._render(messages, add_generation_prompt=True)
        closed = self._render(messages + [assistant], add_generation_prompt=False)
        answer = assistant["content"][0]["text"]
        closing = closed[len(opened) + len(answer) :]
        tokenizer = self.processor.tokenizer
        if tokens and tokens[-1] in tokenizer.eos_token_ids:
            eos_text = tokenizer.decode([tokens[-1]], skip_special_tokens=False)
            closing = closing.removeprefix(eos_text)
        return PreparedPrompt(tokenizer.encode(closing))
