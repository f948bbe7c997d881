"""YAML read exactly as DVC reads params.yaml and dvc.lock: ruamel.yaml's safe loader, YAML 1.2.

DVC parses both files with ``ruamel.yaml.YAML(typ="safe").load(text)``
(``dvc.utils.serialize.parse_yaml``). graft must read them the same way, or a stage trains with
one value while dvc.lock and the lineage record another: YAML 1.1 loaders such as PyYAML's
``safe_load`` read ``010`` as octal 8 and ``on``/``off``/``yes``/``no`` as booleans, where
YAML 1.2 reads the decimal 10 and the strings. The safe loader builds plain ``dict``, ``list``,
``str``, ``int``, ``float``, ``bool``, ``None`` and ``datetime`` values (not the round-trip
loader's ``CommentedMap`` and ``ScalarFloat``), so what it returns goes straight to pydantic.

Spellings that the two YAML versions read differently are not refused once read the 1.2 way,
as none surprises a user in params.yaml: a leading-zero integer such as ``010`` is ten, as
written and as DVC records it (YAML 1.2 spells octal ``0o10``); ``on``/``off``/``yes``/``no``
are the words as written, which pydantic turns into the booleans they mean where a setting is
a ``bool`` and keeps as written where it is text. Refusing them would only turn away files
that DVC and graft now read alike.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class YAMLSyntaxError(ValueError):
    """The text is not valid YAML (or repeats a key in a mapping, which DVC also refuses)."""


def parse_yaml(text: str) -> Any:
    """Parse the YAML document ``text`` as DVC does, into plain Python values.

    Returns what the document holds: usually a ``dict``, None for an empty document. Raises
    YAMLSyntaxError, carrying ruamel.yaml's message with the line and column, when ``text`` is
    not valid YAML or a mapping repeats a key.
    """
    # A new loader per call, as DVC makes one: a YAML instance keeps state while it loads, so
    # sharing one between threads (the flow's task runners) would not be safe.
    loader = YAML(typ="safe")
    try:
        return loader.load(text)
    except YAMLError as error:
        raise YAMLSyntaxError(str(error)) from None
