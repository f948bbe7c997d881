"""How every ``graft`` command's ``--help`` is laid out: defaults shown, line breaks kept."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, and descriptions that keep their layout.

    Each option's help ends with ``(default: X)`` unless its help already names
    ``%(default)s``, its default is None (the help says what leaving it out does) or it is a
    flag (``store_true``: off unless given). In descriptions and epilogs, a line that starts
    with a space is kept exactly as written (commands, tables); other lines are wrapped to the
    terminal's width, each on its own (argparse would join them all into one paragraph).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:  # nargs 0: a flag (store_true)
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[0].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(
                    textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n".join(lines)
