"""Fine-tuning speed: graft's phase 1 and phase 2 against the textbook loop, same data and model.

Generates an ImageFolder of JPEGs (coloured shapes on noisy backgrounds, one class per colour
and shape) and a pretraining corpus of other colour-and-shape classes, ingests and splits both
with graft's own stages, and starts both sides from the same network: VGG16 pretrained on the
corpus by graft's pretrain stage (``--pretrain-epochs 0``: random weights; ``--init imagenet``:
torchvision's weights from the hub cache). Then, for the same epochs, batch size, learning
rates and augmentation:

- textbook: ``torchvision.datasets.ImageFolder`` + transforms (every JPEG decoded and resized
  every epoch), the frozen backbone forwarded every epoch, AdamW with graft's cosine schedule
  and no weight decay (so only the engineering differs); phase 2 unfreezes the deepest
  block (VGG16: ``features[24:]``) at a low learning rate;
- graft: :func:`graft.training.finetune.finetune` (images decoded once, head inputs cached per
  view in phase 1, VGG's classifier input folded (graft/training/folding.py), fused AdamW,
  cosine schedule, best epoch kept).

Phase 1 is timed for both head scopes (``top_module``: VGG's whole classifier; ``last_layer``:
only the new layer). Prints a table; the last line is one JSON object.

    python benchmarks/train.py              # VGG16 at 32 px, 10 epochs (minutes on a CPU)
    python benchmarks/train.py --quick      # a smoke run in seconds
    python benchmarks/train.py --seeds 0 1 2 3 4   # accuracy over several runs (a GPU helps)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image, ImageColor, ImageDraw
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from graft.config.params import (
    Augment,
    Common,
    Finetune,
    HeadPhase,
    Ingest,
    Pretrain,
    Source,
    Sources,
    Split,
    UnfreezePhase,
)
from graft.data.ingest import ingest
from graft.data.loaders import load_split, make_loader
from graft.data.split import make_splits
from graft.training.checkpoints import CheckpointMeta, save_checkpoint
from graft.training.determinism import use_deterministic_kernels
from graft.training.device import resolve_device
from graft.training.finetune import finetune
from graft.training.loop import predict
from graft.training.models import (
    backbone_blocks,
    build_model,
    head_module,
    last_linear_name,
    replace_head,
)
from graft.training.pretrain import pretrain
from graft.training.weights import starting_weights

SHAPES = ("circle", "square", "triangle", "cross", "ring")
# Ten hues; class i is hue i drawn as shape i % 5, so colour and shape both carry the label.
HUES = ("red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "brown")
MEAN = STD = (0.5, 0.5, 0.5)


def draw_image(
    shape: str, colour: tuple[int, int, int], side: int, rng: random.Random
) -> Image.Image:
    """One shape of jittered size, place and colour on a noisy background."""
    noise = np.random.default_rng(rng.randrange(2**32)).integers(60, 190, (side, side, 3))
    image = Image.fromarray(noise.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.35) * side
    cx, cy = (rng.uniform(radius, side - radius) for _ in range(2))
    fill = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in colour)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        corners = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
        draw.polygon(corners, fill)
    elif shape == "cross":
        draw.rectangle((cx - radius, cy - radius / 3, cx + radius, cy + radius / 3), fill=fill)
        draw.rectangle((cx - radius / 3, cy - radius, cx + radius / 3, cy + radius), fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(2, int(radius / 3)))
    return image


def generate(
    root: Path, classes: int, per_class: int, side: int, seed: int, shift: int = 0
) -> list[str]:
    """``per_class`` JPEGs for each of ``classes`` colour-and-shape classes under ``root``.

    Class i is hue i drawn as shape (i + shift) % 5: another ``shift`` gives other classes
    made of the same colours and shapes (the pretraining corpus).
    """
    rng = random.Random(seed)
    names = [f"{hue}-{SHAPES[(i + shift) % len(SHAPES)]}" for i, hue in enumerate(HUES)]
    names = names[:classes]
    for name in names:
        hue, shape = name.split("-")
        (root / name).mkdir(parents=True)
        colour = ImageColor.getrgb(hue)
        for i in range(per_class):
            image = draw_image(shape, (colour[0], colour[1], colour[2]), side, rng)
            image.save(root / name / f"{i:04d}.jpg", quality=90)
    return names


def textbook_folders(splits: pd.DataFrame, source: Path, out: Path) -> None:
    """ImageFolder trees ``out/<split>/<class>/`` linking the very files graft split."""
    for row in splits[splits["role"] == "target"].itertuples():
        link = out / str(row.split) / str(row.label) / Path(str(row.path)).name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(source / str(row.label) / Path(str(row.path)).name, link)


def textbook_finetune(
    model: nn.Module,
    folders: Path,
    *,
    size: int,
    epochs: int,
    batch_size: int,
    head_lr: float,
    deep_lr: float,
    deep_head_lr: float,
    scope: str,
    unfreeze: bool,
    device: torch.device,
) -> tuple[float, float]:
    """The notebook recipe; returns (phase 1 seconds, phase 2 seconds) and trains ``model``."""
    augment = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomAffine(degrees=10, translate=(0.1, 0.1)),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    plain = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    train = DataLoader(
        torchvision.datasets.ImageFolder(str(folders / "train"), augment),
        batch_size=batch_size,
        shuffle=True,
    )
    val = DataLoader(
        torchvision.datasets.ImageFolder(str(folders / "val"), plain), batch_size=batch_size
    )
    for parameter in model.parameters():
        parameter.requires_grad = False
    head = (
        head_module(model)
        if scope == "top_module"
        else model.get_submodule(last_linear_name(model))
    )
    for parameter in head.parameters():
        parameter.requires_grad = True
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(head.parameters(), lr=head_lr, weight_decay=0.0)
    run_epochs(model, optimizer, train, val, epochs, device)
    phase1 = time.perf_counter() - started
    if not unfreeze:
        return phase1, 0.0
    deepest = backbone_blocks(model)[-1]  # VGG16: features[24:]
    for parameter in deepest.parameters():
        parameter.requires_grad = True
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(
        [
            {"params": head_module(model).parameters(), "lr": deep_head_lr},
            {"params": deepest.parameters(), "lr": deep_lr},
        ],
        weight_decay=0.0,
    )
    run_epochs(model, optimizer, train, val, epochs, device)
    return phase1, time.perf_counter() - started


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: DataLoader[tuple[torch.Tensor, int]],
    val: DataLoader[tuple[torch.Tensor, int]],
    epochs: int,
    device: torch.device,
) -> None:
    # The same recipe as graft's (cosine schedule, no weight decay), so that only the
    # engineering differs between the two sides.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        model.train()
        for inputs, targets in train:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))
            loss.backward()
            optimizer.step()
        schedule.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, targets in val:
                correct += int((model(inputs.to(device)).argmax(1).cpu() == targets).sum())
        print(f"  textbook epoch {epoch + 1}: val accuracy {correct / len(val.dataset):.3f}")  # type: ignore[arg-type]


def textbook_accuracy(model: nn.Module, folder: Path, size: int, device: torch.device) -> float:
    plain = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    loader = DataLoader(torchvision.datasets.ImageFolder(str(folder), plain), batch_size=64)
    model.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            correct += int((model(inputs.to(device)).argmax(1).cpu() == targets).sum())
            seen += len(targets)
    return correct / seen


def backbone(
    arguments: argparse.Namespace, splits: pd.DataFrame, dataset: Path, common: Common
) -> tuple[nn.Module, str]:
    """The network both loops start from, and how it was made.

    With ``--init scratch`` and ``--pretrain-epochs`` > 0 (the default) it is graft's own
    pretrain stage on the generated corpus of other classes: random VGG16 features are nearly
    constant, so fine-tuning from them says little about either loop's accuracy.
    """
    if arguments.init != "scratch" or not arguments.pretrain_epochs:
        return starting_weights(arguments.init, arguments.arch, 2).model, arguments.init
    settings = Pretrain(
        arch=arguments.arch, epochs=arguments.pretrain_epochs, batch_size=32, lr=3e-4,
        patience=arguments.pretrain_epochs, augment=Augment(rotation=10, translate=0.1),
    )  # fmt: skip
    started = time.perf_counter()
    trained = pretrain(splits, dataset, settings, common)
    accuracy = trained.meta.metrics["val_accuracy"]
    print(f"== pretrained in {time.perf_counter() - started:.0f}s: val accuracy {accuracy:.3f}")
    return trained.model, f"pretrained on the generated corpus (val accuracy {accuracy:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="training image size (px)")
    parser.add_argument("--source-size", type=int, default=64, help="generated JPEG side (px)")
    parser.add_argument("--views", type=int, default=4, help="finetune.head.views (params.yaml)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--init",
        default="scratch",
        help="pretrain.init of the shared starting point: scratch (then --pretrain-epochs on "
        "a generated corpus of other classes) or imagenet (torch hub cache)",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="0: random weights")
    parser.add_argument("--pretrain-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument("--quick", action="store_true", help="3 classes, 2 epochs: seconds")
    arguments = parser.parse_args()
    use_deterministic_kernels()  # as the stage entry points do
    if arguments.quick:
        arguments.classes, arguments.train_per_class, arguments.epochs = 3, 4, 2
        arguments.pretrain_epochs, arguments.pretrain_per_class = 1, 10
    device = resolve_device(arguments.device)
    common = Common(seed=0, image_size=arguments.size, mean=MEAN, std=STD, device=arguments.device)
    # Per class: train_per_class to train on, half as many to validate, 1.5x as many to test
    # (a larger test split, so that the two loops' accuracies differ by less than its noise).
    per_class = arguments.train_per_class * 3
    times: dict[str, list[float]] = {}
    accuracies: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="graft-train-bench-") as scratch:
        root = Path(scratch)
        names = generate(root / "target", arguments.classes, per_class, arguments.source_size, 1)
        corpus = arguments.pretrain_per_class
        generate(root / "pretrain", arguments.classes, corpus, arguments.source_size, 2, shift=2)
        sources = Sources(
            pretrain=Source(uri=root / "pretrain", max_reject_fraction=0.0),
            target=Source(uri=root / "target", max_reject_fraction=0.0),
        )
        dataset = root / "ingested"
        manifest, _ = ingest(Ingest(sources=sources), dataset, root / "cache")
        fractions = {"pretrain": {"train": 0.8, "val": 0.2, "test": 0.0}}
        fractions["target"] = {"train": 1 / 3, "val": 1 / 6, "test": 1 / 2}
        splits = make_splits(manifest, Split.model_validate(fractions), common.seed)
        textbook_folders(splits, root / "target", root / "folders")
        torch.manual_seed(common.seed)
        start, start_description = backbone(arguments, splits, dataset, common)
        replace_head(start, len(names))
        checkpoint = root / "start.pt"
        meta = CheckpointMeta(
            arch=arguments.arch, classes=names, image_size=arguments.size, mean=list(MEAN),
            std=list(STD), epoch=0, metrics={}, init=arguments.init,
        )  # fmt: skip
        save_checkpoint(checkpoint, start, meta)
        train_images = int(((splits["role"] == "target") & (splits["split"] == "train")).sum())
        test_set = load_split(
            splits, dataset, root / "decoded", role="target", split="test", size=arguments.size
        )
        epochs = arguments.epochs

        def settings(scope: str, unfreeze_epochs: int) -> Finetune:
            return Finetune(
                batch_size=32,
                patience=epochs,  # no early stop: both sides run every epoch
                augment=Augment(rotation=10, translate=0.1),
                head=HeadPhase(epochs=epochs, lr=1e-3, scope=scope, views=arguments.views),  # type: ignore[arg-type]
                unfreeze=UnfreezePhase(blocks=1, epochs=unfreeze_epochs, lr=1e-5, head_lr=1e-4),
            )

        def record(key: str, value: float, into: dict[str, list[float]]) -> None:
            into.setdefault(key, []).append(value)

        for seed in arguments.seeds:
            seeded = common.model_copy(update={"seed": seed})
            for scope, unfreeze in (("top_module", True), ("last_layer", False)):
                print(f"== seed {seed}, {scope}: textbook loop", flush=True)
                model = build_model(arguments.arch, len(names))
                model.load_state_dict(start.state_dict())
                torch.manual_seed(seed)
                new_layer = model.get_submodule(last_linear_name(model))
                assert isinstance(new_layer, nn.Linear)
                new_layer.reset_parameters()
                model.to(device)
                text1, text2 = textbook_finetune(
                    model, root / "folders", size=arguments.size, epochs=epochs, batch_size=32,
                    head_lr=1e-3, deep_lr=1e-5, deep_head_lr=1e-4, scope=scope,
                    unfreeze=unfreeze, device=device,
                )  # fmt: skip
                baseline = textbook_accuracy(
                    model, root / "folders" / "test", arguments.size, device
                )
                print(f"== seed {seed}, {scope}: graft", flush=True)
                trained = finetune(
                    splits, dataset, settings(scope, epochs if unfreeze else 0), seeded,
                    backbone=checkpoint, arch=arguments.arch,
                )  # fmt: skip
                loader = make_loader(test_set, seeded, batch_size=64)
                probabilities = predict(trained.model.to(device), loader, device)
                accuracy = float((probabilities.argmax(1) == test_set.targets).float().mean())
                record(f"{scope} phase 1 textbook", text1, times)
                record(f"{scope} phase 1 graft", trained.seconds["head"], times)
                if unfreeze:
                    record("phase 2 textbook", text2, times)
                    record("phase 2 graft", trained.seconds["unfreeze"], times)
                record(f"{scope} textbook", baseline, accuracies)
                record(f"{scope} graft", accuracy, accuracies)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    rows = [
        ("phase 1 (top_module)", "top_module phase 1", "top_module"),
        ("phase 2", "phase 2", "top_module"),
        ("phase 1 (last_layer)", "last_layer phase 1", "last_layer"),
    ]
    seeds = arguments.seeds
    print(
        f"\n{arguments.arch} at {arguments.size} px, {train_images} training images, "
        f"{len(names)} classes, {epochs} epochs per phase, device {device}, seeds {seeds}\n"
        f"both loops start from: {start_description}; graft views: {arguments.views}\n"
        f"seconds are per run (mean over seeds); accuracy is on {len(test_set)} test images, "
        "after both phases for top_module"
    )
    header = ("", "textbook s", "img/s", "graft s", "img/s", "speedup", "acc text", "acc graft")
    print("".join(f"{h:>12}" if i else f"{h:<22}" for i, h in enumerate(header)))
    speedups: dict[str, float] = {}
    for label, timing, scope in rows:
        text_s, graft_s = mean(times[f"{timing} textbook"]), mean(times[f"{timing} graft"])
        speedups[label] = text_s / graft_s
        work = train_images * epochs
        cells = [f"{text_s:.1f}", f"{work / text_s:.1f}", f"{graft_s:.1f}", f"{work / graft_s:.1f}"]
        cells.append(f"{speedups[label]:.2f}x")
        show = label != "phase 1 (top_module)"  # top_module accuracy is after phase 2
        for side in ("textbook", "graft"):
            cells.append(f"{mean(accuracies[f'{scope} {side}']):.3f}" if show else "-")
        print(f"{label:<22}" + "".join(f"{c:>12}" for c in cells))
    figures = {
        "phase1_speedup": speedups["phase 1 (top_module)"],
        "phase2_speedup": speedups["phase 2"],
        "accuracy": mean(accuracies["top_module graft"]),
        "baseline_accuracy": mean(accuracies["top_module textbook"]),
        "device": str(device),
        "phase1_last_layer_speedup": speedups["phase 1 (last_layer)"],
        "last_layer_accuracy": mean(accuracies["last_layer graft"]),
        "last_layer_baseline_accuracy": mean(accuracies["last_layer textbook"]),
        "accuracies": accuracies,
        "seconds": times,
        "start": start_description,
        "arch": arguments.arch,
        "image_size": arguments.size,
        "views": arguments.views,
        "train_images": train_images,
        "test_images": len(test_set),
        "epochs": epochs,
        "seeds": seeds,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
