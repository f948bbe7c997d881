"""Whether this machine's torchvision knows ``pretrain.arch``: the training stages' check.

Apart from :mod:`graft.config.checks` so that the training stages, which need only this,
do not depend on the code that inspects source folders (a change there must not re-run them).
"""

from __future__ import annotations

from graft.config.params import Params, ParamsError, describe_problems


def arch_problems(params: Params) -> list[tuple[str, str]]:
    """``(key, message)`` when this torchvision has no classifier named ``pretrain.arch``.

    The message suggests known names sharing the first three letters (or the first few names).
    Returns an empty list when the architecture is known. Imports torchvision on first use.
    """
    # Imported here: torchvision takes seconds to import, and most callers never need it.
    from graft.training.models import unknown_architecture

    problem = unknown_architecture(params.pretrain.arch)
    return [("pretrain.arch", problem)] if problem else []


def check_arch(params: Params, *, origin: str = "params") -> None:
    """Raise ParamsError when this torchvision does not know ``pretrain.arch``.

    ``origin`` names the params file in the message.
    """
    problems = arch_problems(params)
    if problems:
        raise ParamsError(describe_problems(origin, problems))
