"""Stage ``register``: gate the model on its test metrics and package it with a model card.

See graft.registry.register: a failed gate fails the stage, naming each metric, and writes
nothing.
"""

from __future__ import annotations

import sys

from graft.config.params import load_params
from graft.errors import run_main
from graft.registry.register import register


def main() -> None:
    """Gate and package the model (``paths.register.package``); run from the project root."""
    card = register(load_params())
    print(
        f"registered {card['name']}: accuracy {card['metrics']['accuracy']:.4f}, "
        f"weights sha256 {card['inputs_sha256']['weights'][:12]}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_main(main)
