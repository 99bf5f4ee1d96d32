"""Chat templates: the default installed on base models, `--chat-template FILE`, and the end-of-turn token.

A base model's tokenizer has no chat template. Dialoop then installs ChatML (or the template of
`--chat-template FILE`, for any model), adds the markers it writes (`<|im_start|>`, `<|im_end|>`, ...) as
special tokens when the vocabulary lacks them, and notes what it did on the tokenizer (`init_kwargs`); the
model's embeddings grow to match (`loading.ensure_special_tokens`, new rows = the mean embedding) and its
config gets the same note (`NOTE_KEY`), so a saved model dir says where its template came from.

The end-of-turn token (EOS for generation and for SFT's targets) is read from the template itself: the
first special token it writes after an assistant reply.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ChatML, as written in the format's description: each turn opens with <|im_start|>ROLE\n and ends with
# <|im_end|>\n; the generation prompt opens an assistant turn
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NOTE_KEY = "dialoop_chat_template"  # in config.json (and tokenizer.init_kwargs): where the template came from
ADDED_KEY = "dialoop_added_tokens"  # in tokenizer.init_kwargs: the special tokens added for the template
# markers a template writes that must be single special tokens: <|name|> and <snake_case_name>
_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<[a-z]+(?:_[a-z]+)+>")
_PROBE = "dialoop-probe-reply"


class ChatTemplateError(ValueError):
    """A chat template that Dialoop cannot use; the message says why and what to do."""


def read_template(path: str | Path) -> str:
    """The Jinja text of a `--chat-template` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"cannot read the chat template {path}: {exc}") from exc
    if "messages" not in text:
        raise ChatTemplateError(f"{path} does not look like a Jinja chat template (it never uses `messages`)")
    return text


def template_markers(template: str) -> list[str]:
    """The markers a template writes that must be single special tokens: `<|name|>`, `<snake_case_name>`."""
    return list(dict.fromkeys(_MARKER.findall(template)))


def has_template(tokenizer: Any) -> bool:
    return isinstance(getattr(tokenizer, "chat_template", None), str) and bool(tokenizer.chat_template)


def install_template(tokenizer: Any, template: str | None = None, *, source: str | None = None) -> list[str]:
    """Give `tokenizer` the chat template `template` (default ChatML), adding the special tokens it writes.

    `source` names the template in the note (default: "ChatML"). Returns the tokens added to the vocabulary.
    """
    text = CHATML if template is None else template
    name = source or ("ChatML" if template is None else "a custom template")
    vocab = tokenizer.get_vocab()
    added = [t for t in template_markers(text) if t not in vocab]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.chat_template = text
    reason = "the model has no chat template" if template is None else "--chat-template"
    note = f"{name}, installed by Dialoop ({reason})"
    if added:
        note += f"; added special tokens {', '.join(added)}"
    tokenizer.init_kwargs[NOTE_KEY] = note
    tokenizer.init_kwargs[ADDED_KEY] = [*tokenizer.init_kwargs.get(ADDED_KEY, []), *added]
    log.warning("%s: chat template %s", tokenizer.name_or_path or "tokenizer", note)
    return added


def template_note(tokenizer: Any) -> str | None:
    """What `install_template` did to this tokenizer object, or None."""
    note = tokenizer.init_kwargs.get(NOTE_KEY)
    return str(note) if note else None


def added_tokens(tokenizer: Any) -> list[str]:
    """The special tokens `install_template` added (their embeddings are new)."""
    return [str(t) for t in tokenizer.init_kwargs.get(ADDED_KEY, [])]


def _special_tokens(tokenizer: Any) -> set[str]:
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    special |= {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    return special


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn in the tokenizer's chat template.

    A one-turn conversation is rendered and the first special token after the reply's text is it (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Mistral's `</s>`, ...).
    """
    if not has_template(tokenizer):
        raise ChatTemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE}]
    try:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception as exc:  # a template may raise anything (jinja's raise_exception included)
        raise ChatTemplateError(f"the chat template cannot render a user/assistant exchange: {exc}") from exc
    if _PROBE not in text:
        raise ChatTemplateError("the chat template does not write the assistant's reply")
    after = text[text.rindex(_PROBE) + len(_PROBE) :]
    found = [(after.find(t), t) for t in _special_tokens(tokenizer) if t and t in after]
    if not found:
        raise ChatTemplateError(
            "the chat template writes no special token after an assistant reply, so a reply's end cannot be "
            f"told: it writes {after!r}. Pass a template that ends each turn with a special token "
            "(--chat-template FILE)."
        )
    # the earliest; of tokens starting at the same place, the longest
    return min(found, key=lambda f: (f[0], -len(f[1])))[1]
