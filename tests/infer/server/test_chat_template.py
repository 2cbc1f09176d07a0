"""Chat templates rendered by transformers' rules (chat_template_utils.py): trim_blocks + lstrip_blocks, loop
controls, tojson without ASCII escaping, raise_exception, a sandbox. Expected strings are the prompts these public
templates are documented to produce."""
import pytest

from jaxtx.infer.server import chat_template

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9\U0001F600"}]

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
          "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Zephyr's template: one tag per line, which trim_blocks / lstrip_blocks must remove
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


def test_llama3_template():
    out = chat_template.render(LLAMA3, MSGS,
                               special_tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi \u00e9\U0001F600<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_gen = chat_template.render(LLAMA3, MSGS, add_generation_prompt=False, special_tokens={"bos_token": "<s>"})
    assert no_gen.endswith("<|eot_id|>") and no_gen.startswith("<s>")


def test_trim_and_lstrip_blocks():
    out = chat_template.render(ZEPHYR, MSGS, special_tokens={"eos_token": "</s>"})
    assert out == "<|system|>\nBe brief.</s>\n<|user|>\nHi \u00e9\U0001F600</s>\n<|assistant|>\n"


def test_loop_controls_and_tojson():
    t = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m | tojson }}"
         "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}|{{ tools | tojson(indent=2) }}|"
         "{{ {'b': 1, 'a': '<&>'} | tojson(sort_keys=True) }}")
    out = chat_template.render(t, MSGS, tools=[{"x": "\u00fc"}])
    # non-ASCII kept, no HTML escaping of <, >, & (jinja's own tojson would write \u003c)
    assert out == ('{"role": "user", "content": "Hi \u00e9\U0001F600"}|[\n  {\n    "x": "\u00fc"\n  }\n]|'
                   '{"a": "<&>", "b": 1}')


def test_raise_exception_and_errors():
    t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    with pytest.raises(chat_template.TemplateError, match="first message must be user"):
        chat_template.render(t, MSGS)
    assert chat_template.render(t, MSGS[1:]) == "ok"
    with pytest.raises(chat_template.TemplateError, match="syntax error at line 1"):
        chat_template.render("{% for %}", MSGS)
    with pytest.raises(chat_template.TemplateError):  # the sandbox refuses internals
        chat_template.render("{{ messages.__class__.__mro__[1].__subclasses__() }}", MSGS)
    with pytest.raises(chat_template.TemplateError):  # immutable: templates cannot mutate the request's messages
        chat_template.render("{{ messages.append(1) }}", MSGS)


def test_strftime_and_extra_variables():
    out = chat_template.render("{{ strftime_now('%Y') }}-{{ enable_thinking }}", MSGS, enable_thinking=False)
    year, flag = out.split("-")
    assert year.isdigit() and len(year) == 4 and flag == "False"
