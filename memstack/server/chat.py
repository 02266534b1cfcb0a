"""Chat templates: messages -> prompt text, from the model's tokenizer.

A tokenizer with a `chat_template` attribute (SmolLM2-Instruct's, read from its GGUF) renders
with that Jinja template; memstack's own tokenizers (byte, gpt2, bpe<N>) have none and use
`DEFAULT_TEMPLATE`, a plain-text transcript:

    System: You are terse.
    User: Hello
    Assistant:

(the model continues after "Assistant:"; it stops at its end-of-text token, or at the request's
`stop` strings -- e.g. "\\nUser:" -- like any completion). Templates render in Jinja's immutable
sandbox, as transformers does, so a template cannot reach Python objects. The end-of-turn token of
the template (SmolLM2: `<|im_end|>`) is a stop token of every chat completion.

Special tokens written by a user inside message content (e.g. "<|im_end|>") are encoded as special
tokens, as in transformers' and vLLM's chat serving; memstack does not escape them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
                    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "default"

    @cached_property
    def _compiled(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template that fails (e.g. raise_exception on a role) raises ValueError."""
        from jinja2 import TemplateError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from None


def chat_template(tokenizer) -> ChatTemplate:
    """The tokenizer's chat template, or the documented default."""
    spec = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if spec:
        return ChatTemplate(spec["template"], spec.get("bos_token", ""), spec.get("eos_token", ""),
                            name=getattr(tokenizer, "name", "model"))
    return ChatTemplate(DEFAULT_TEMPLATE)


def stop_ids(tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """Token ids that end a chat turn: the tokenizer's end-of-text and the template's EOS."""
    ids = [tokenizer.eot_id]
    if template.eos_token:
        enc = tokenizer.encode(template.eos_token)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return tuple(ids)
