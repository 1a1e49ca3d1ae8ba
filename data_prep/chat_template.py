"""Chat templates: the built-in `fox1` format or a .jinja file, rendered exactly as transformers does.

Rendering goes through transformers' own `render_jinja_template` (its sandboxed Jinja environment:
ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`,
`tojson`, `strftime_now`, `{% generation %}`), with the variables `apply_chat_template` passes:
`messages`, `add_generation_prompt` and the tokenizer's special-token strings (`bos_token`,
`eos_token`, `unk_token`, `pad_token`). So the text rendered here is the text
`AutoTokenizer.from_pretrained(<exported dir>).apply_chat_template(messages)` renders.

The trained character spans of a rendered conversation (the assistant turns):
  * if the template marks them with `{% generation %}...{% endgeneration %}`, those spans
    (transformers' `return_assistant_tokens_mask` semantics);
  * otherwise, for every assistant message j, the text that rendering messages[:j+1] adds to
    rendering messages[:j] with `add_generation_prompt=True`: the assistant content plus whatever
    the template writes after it within that turn (for `fox1`: the eos token). This needs a
    template whose renderings of a conversation's prefixes are prefixes of its rendering, and one
    that writes an assistant turn's header when add_generation_prompt is true (so the header is not
    trained); `check_template` probes both when the plan is loaded.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .common import DataPrepError

# Fox-1-Instruct's format: <|system|>\n...<eos> <|user|>\n...<eos> <|assistant|>\n...<eos>, using the
# tokenizer's own eos through `eos_token` (never an id). One line, as transformers templates are written:
# text between tags would be output. No bos: pretraining documents carry none either (only an eos
# between documents), and apply_chat_template adds no special tokens of its own.
FOX1_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: Dict[str, str] = {"fox1": FOX1_TEMPLATE}

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateRenderError(Exception):
    """The template refused or failed to render one conversation (counted, never fatal)."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # a built-in name, or the .jinja file's path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def uses_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.text))


def load_chat_template(spec: str) -> ChatTemplate:
    """A built-in name (`fox1`) or a path to a Jinja file; DataPrepError when neither."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataPrepError(f"must be a built-in template name ({', '.join(BUILTIN_TEMPLATES)}) or a .jinja file")
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(spec, BUILTIN_TEMPLATES[spec])
    path = os.path.abspath(os.path.expanduser(os.path.expandvars(spec)))
    if not os.path.isfile(path):
        raise DataPrepError(f"{spec!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                            f"nor an existing file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{path}: cannot read the template ({e})") from None
    if not text.strip():
        raise DataPrepError(f"{path}: the template file is empty")
    return ChatTemplate(path, text)


class ChatRenderer:
    """Renders conversations with one template and one tokenizer's special-token strings."""

    def __init__(self, template: ChatTemplate, special_tokens: Dict[str, str]):
        self.template = template
        # what apply_chat_template passes: tokenizer.special_tokens_map ({'bos_token': '<s>', ...})
        self.special_tokens = dict(special_tokens)
        self._generation_tags = template.uses_generation_tags

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt, False)[0]

    def _render(self, messages, add_generation_prompt: bool, spans: bool) -> Tuple[str, List[Tuple[int, int]]]:
        # transformers takes seconds to import: only when a chat is rendered, so the pretraining
        # commands and `data_prep.plan --validate` (which import this module) start fast
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[list(messages)], chat_template=self.template.text,
                return_assistant_tokens_mask=spans, add_generation_prompt=add_generation_prompt,
                **self.special_tokens)
        except jinja2.TemplateSyntaxError as e:  # the template itself, not this conversation
            raise DataPrepError(f"{self.template.name}: not a valid Jinja template "
                                f"(line {e.lineno}: {e.message})") from None
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # raise_exception(...) and template bugs
            raise TemplateRenderError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
        return texts[0], ([tuple(s) for s in indices[0]] if spans else [])

    def render_with_spans(self, messages: Sequence[dict]) -> Tuple[str, List[Tuple[int, int]]]:
        """(text, [(start, end) character spans to train on]) for a conversation."""
        if self._generation_tags:
            text, spans = self._render(messages, False, True)
            return text, [s for s in spans if s[1] > s[0]]
        text = self.render(messages)
        spans = []
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:j], add_generation_prompt=True)
            turn = self.render(messages[: j + 1]) if j + 1 < len(messages) else text
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise TemplateRenderError(f"rendering messages[:{j + 1}] is not a prefix of the whole conversation")
            if len(turn) > len(prompt):
                spans.append((len(prompt), len(turn)))
        return text, spans


_PROBE = [
    {"role": "system", "content": "PROBE-SYSTEM"},
    {"role": "user", "content": "PROBE-USER-1"},
    {"role": "assistant", "content": "PROBE-ASSISTANT-1"},
    {"role": "user", "content": "PROBE-USER-2"},
    {"role": "assistant", "content": "PROBE-ASSISTANT-2"},
]


def check_template(template: ChatTemplate, special_tokens: Dict[str, str]) -> None:
    """Render a probe conversation and check the trained spans come out right (DataPrepError if not):
    one span per assistant turn holding its content and nothing of the user's."""
    r = ChatRenderer(template, special_tokens)
    probe = _PROBE
    try:
        r.render(probe)
    except TemplateRenderError:
        probe = _PROBE[1:]  # a template without system prompts
    try:
        text, spans = r.render_with_spans(probe)
    except TemplateRenderError as e:
        raise DataPrepError(f"{template.name}: cannot render a user/assistant conversation ({e}); "
                            "mark the assistant turns with {% generation %} ... {% endgeneration %}") from None
    answers = [m["content"] for m in probe if m["role"] == "assistant"]
    trained = [text[a:b] for a, b in spans]
    if len(trained) != len(answers) or any(ans not in t for ans, t in zip(answers, trained)):
        raise DataPrepError(f"{template.name}: the assistant turns it renders cannot be located "
                            f"(trained text {trained!r}); mark them with {{% generation %}}")
    if any("PROBE-USER" in t or "PROBE-SYSTEM" in t for t in trained):
        raise DataPrepError(f"{template.name}: the trained span of an assistant turn holds user/system text "
                            f"({trained!r}); does the template honour add_generation_prompt?")
    if not template.uses_generation_tags and any(not t.lstrip().startswith(ans) for ans, t in zip(answers, trained)):
        raise DataPrepError(f"{template.name}: the trained span of an assistant turn does not start with its content "
                            f"({trained!r}), so the assistant header would be trained: render the header when "
                            "add_generation_prompt is true, or mark the content with {% generation %}")
