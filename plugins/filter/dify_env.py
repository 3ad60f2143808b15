"""Filters for Dify's docker/.env: read it as a dict, and write values back into
.env.example's layout (wecom.dify.dify_env_parse, wecom.dify.dify_env_render).

Compose's .env is one NAME=value per line; comments and blank lines are kept for the operator.
Values are taken verbatim (everything after the first '='), as compose reads an unquoted value.
"""

import re

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def dify_env_parse(text):
    """NAME -> raw value for every assignment line, in file order (a later line wins)."""
    values = {}
    for line in (text or "").splitlines():
        match = _ASSIGNMENT.match(line.rstrip("\r"))
        if match and not line.lstrip().startswith("#"):
            values[match.group(1)] = match.group(2)
    return values


def dify_env_render(example, values, extra_header):
    """.env.example with each assignment's value taken from `values`; names .env.example does not
    have are appended, in `values` order, after `extra_header` (a comment line)."""
    values = {name: _text(value) for name, value in values.items()}
    seen = set()
    lines = []
    for line in (example or "").splitlines():
        match = _ASSIGNMENT.match(line.rstrip("\r"))
        if match and not line.lstrip().startswith("#") and match.group(1) in values:
            name = match.group(1)
            seen.add(name)
            lines.append(f"{name}={values[name]}")
        else:
            lines.append(line.rstrip("\r"))
    extra = [f"{name}={value}" for name, value in values.items() if name not in seen]
    if extra:
        lines += ["", extra_header, *extra]
    return "\n".join(lines) + "\n"


def _text(value):
    # YAML booleans become compose's spelling, not Python's.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class FilterModule:
    def filters(self):
        return {"dify_env_parse": dify_env_parse, "dify_env_render": dify_env_render}
