"""Chat templates of the generated checkpoints, each in the turn format of the family it stands for.

The templates of families whose models call tools render them as those models were trained to see them,
so that the tool-call parsers are tested against the formats they exist for: ChatML with Hermes/Qwen
``<tool_call>`` blocks (``--tool-call-parser hermes``), Llama 3.1's JSON calls (``llama3_json``), Mistral's
``[TOOL_CALLS]`` (``mistral``) and Gemma 3 with vLLM's pythonic tool prompt (``pythonic``). Each renders the
tools, assistant messages carrying ``tool_calls`` (arguments decoded, as the server passes them) and
``tool`` messages; without tools each renders exactly as before tools existed.
"""

from __future__ import annotations

LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first %}{%- set content = system_message + message['content'] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{{- bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

LLAMA3_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' and tools and loop.first %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON '
            'for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the '
            'format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use '
            'variables.\n\n' }}
        {%- for tool in tools %}
            {{- (tool | tojson(indent=4)) + '\n\n' }}
        {%- endfor %}
        {{- message['content'] + '<|eot_id|>' }}
    {%- elif message['role'] == 'assistant' and message.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- for call in message.tool_calls %}
            {{- '{"name": ' + (call.function.name | tojson) + ', "parameters": ' + (call.function.arguments | tojson) + '}' }}
            {%- if not loop.last %}{{- '; ' }}{%- endif %}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message['role'] == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

MISTRAL_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools and loop.index0 == ns.last_user %}
            {{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.first %}
            {{- '[INST] ' + system_message + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' and message.tool_calls %}
        {{- '[TOOL_CALLS] [' }}
        {%- for call in message.tool_calls %}
            {{- '{"name": ' + (call.function.name | tojson) + ', "arguments": ' + (call.function.arguments | tojson)
                + ', "id": ' + (call.id | tojson) + '}' }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']' + eos_token }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + (message['content'] | tojson) + ', "call_id": '
            + (message.tool_call_id | tojson) + '}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}"""

PHI3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# Gemma's turns; with tools, vLLM's pythonic tool prompt for Gemma 3 in the first user turn.
GEMMA_CHAT_TEMPLATE = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools %}
    {%- set ns = namespace(text=first_user_prefix + 'You have access to functions. If you decide to invoke any of '
        'the function(s), you MUST put it in the format of\n[func_name1(params_name1=params_value1, '
        'params_name2=params_value2...), func_name2(params)]\n\nYou SHOULD NOT include any other text in the '
        'response if you call a function\n') %}
    {%- for tool in tools %}
        {%- set ns.text = ns.text + (tool | tojson) + '\n' %}
    {%- endfor %}
    {%- set first_user_prefix = ns.text + '\n' %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'assistant' and message.tool_calls %}
        {{- '<start_of_turn>model\n[' }}
        {%- for call in message.tool_calls %}
            {{- call.function.name + '(' }}
            {%- for key, value in call.function.arguments.items() %}
                {{- key + '=' + (value | tojson) }}
                {%- if not loop.last %}{{- ', ' }}{%- endif %}
            {%- endfor %}
            {{- ')' }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']<end_of_turn>\n' }}
    {%- elif message['role'] == 'tool' %}
        {{- '<start_of_turn>user\n```tool_output\n' + message['content'] + '\n```<end_of_turn>\n' }}
    {%- else %}
        {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
        {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] }}
        {{- '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""

# ChatML (Qwen, and the other byte-level families); with tools, Qwen 2.5's Hermes-style tool prompt.
CHATML_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with '
        'function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' and not tools %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
    {%- if message['role'] == 'system' and tools and loop.first %}
    {%- elif message['role'] == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}
        {%- for call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": ' + (call.function.name | tojson) + ', "arguments": '
                + (call.function.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message['role'] == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
