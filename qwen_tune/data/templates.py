"""Which chat templates a run can use: the official Qwen templates (as TRL ships them), a Jinja file given with
`--chat_template`, and the seed's ChatML with the run's system message written in (what the embedded model trains on).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def chatml_template(system_message: str | None) -> str:
    """The seed's ChatML, with the run's default system turn written in (or none): what the embedded model trains on."""
    default = ""
    if system_message:
        default = "{{- '<|im_start|>system\\n' + " + _jinja_string(system_message) + " + '<|im_end|>\\n' }}"
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] -%}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}" + default + "{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def official_templates() -> dict[str, Path]:
    """The official Qwen chat templates that the pinned TRL ships (`trl/chat_templates/qwen*.jinja`)."""
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem: p for p in sorted(folder.glob("qwen*.jinja")) if not p.stem.endswith("_training")}


def load_template(name_or_file: str) -> tuple[str, str]:
    """(template text, its name) for `--chat_template`: a Jinja file, or the name of an official Qwen template."""
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    known = official_templates()
    if name_or_file in known:
        return known[name_or_file].read_text(encoding="utf-8"), name_or_file
    raise UserError(f"--chat_template {name_or_file}: not a file, nor an official template name; "
                    f"the names are {', '.join(known)}")


def template_name(template: str) -> str | None:
    """The official name of a template, when it is one of them word for word."""
    for name, path in official_templates().items():
        if path.read_text(encoding="utf-8").strip() == template.strip():
            return name
    return None
