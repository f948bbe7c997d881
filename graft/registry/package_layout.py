"""The layout of the registered model package (``paths.register.package``)."""

from __future__ import annotations

WEIGHTS = "model.pt"  # the fine-tuned checkpoint, loadable with torch.load(weights_only=True)
PROGRAM = "model.pt2"  # the same model as a torch.export program, loadable without graft
CARD_JSON = "model_card.json"
CARD_MARKDOWN = "model_card.md"


def card_file(package: str) -> str:
    """The model card's path inside the package folder ``package``, as a POSIX path (as
    dvc.lock writes them). Raises nothing."""
    return f"{package.rstrip('/')}/{CARD_JSON}"
