"""Models, starting weights, checkpoints, the training loop and the training stages.

- ``models``: torchvision networks by name, their head, and freezing by blocks;
- ``weights``: where starting weights come from (random, ImageNet, a checkpoint);
- ``checkpoints``: the checkpoint format, its metadata, and whether one fits the data;
- ``folding``: VGG's pooled classifier input folded below 224 px (the same training);
- ``head_inputs``: a frozen backbone run once, the head trained on what reaches it;
- ``device``: the device, speed options (amp, channels-last) and on-device sums;
- ``history``: each epoch's figures, the best epoch and early stopping;
- ``fit_state``: the per-epoch state a killed run resumes from;
- ``loop``: one epoch of training, measuring, prediction, and ``fit`` over epochs;
- ``determinism``: seeded blocks that restore the RNGs; deterministic kernels for entry points;
- ``pretrain``, ``finetune``: the training cores;
- ``trained``: what a core returns (``TrainedModel``) and the checkpoint record it builds;
- ``resume``, ``stage``: the resume folder's key, and what every training stage writes.
"""
