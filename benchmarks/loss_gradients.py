"""How hard each loss term pulls on the student at the first step: the norm of each term's gradient on
the student's layers before its classifier, for one batch of tiny100-32 with the shared resnet56
teacher (the accuracy harness's pair, resnet56 → resnet20).

A term whose gradient is many times the cross-entropy's decides where the features go while the
classifier has not learnt yet; the accuracy notes cite these numbers.

    python benchmarks/loss_gradients.py --methods ce,crd,hkd
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import SHARED, unpack_tiny100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ce,crd,hkd")
    p.add_argument("--per-class", type=int, default=50, help="training images per class (the bank's size)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache", default=os.environ.get("KDISTILL_CACHE", str(Path.home() / ".cache" / "kdistill")))
    args = p.parse_args()
    import torch

    from kdistill.checkpoint import load_weights
    from kdistill.data import BatchAugment
    from kdistill.data.folders import load_image_folder
    from kdistill.methods import Batch, RunFacts, StepInfo, build_method
    from kdistill.models import create_model
    from kdistill.step import Distiller

    torch.set_num_threads(1)
    train = load_image_folder(unpack_tiny100(Path(args.cache) / "data") / "train").tensors
    train = train.subset_per_class(args.per_class, 0)
    mean, std = train.channel_stats()
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.batch]
    images, targets, index = train[rows]
    x = BatchAugment(mean, std)(images, train=False)
    facts = RunFacts(input_size=(3, 32, 32), num_samples=len(train), num_classes=100, train_targets=train.targets)
    for method in args.methods.split(","):
        torch.manual_seed(0)
        student = create_model("cifar.resnet20", num_classes=100)
        teacher = create_model("cifar.resnet56", num_classes=100)
        load_weights(teacher, str(SHARED / "teachers" / "resnet56_tiny100-32.pth"))
        m = build_method(method, student=student, teachers=[teacher], facts=facts)
        d = Distiller(student, [teacher], m).train()
        torch.manual_seed(1)
        _, losses = d.forward_train(Batch(x, targets, index), StepInfo())
        body = [p for n, p in student.named_parameters() if not n.startswith("fc.")]
        shown = []
        for name, value in losses.items():
            grads = torch.autograd.grad(value, body, retain_graph=True, allow_unused=True)
            norm = float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))
            shown.append(f"{name} {float(value.detach()):.2f} (gradient norm {norm:.2f})")
        print(f"{method}: " + ", ".join(shown), flush=True)


if __name__ == "__main__":
    main()
