"""How much of a probe task do the images' gray levels alone carry? A no-network reference row.

Probes the 64x64 evaluation image's gray-level histogram (16 bins) plus its mean and standard
deviation, with exactly the linear probe the encoders get (``mlip_ds.eval.linear_probe.run_probe``:
the same label subsamples, fractions, seeds and C search). A task this row does well on is one where
an encoder scores by keeping intensity statistics, which brightness/contrast augmentation teaches it
to drop (docs/ablation.md, "Gray levels"). Writes ``probe.json``/``probe.md`` in --out, readable
with the same tools as an encoder's probe.

    python maintainer/intensity_probe.py --train-data DIR --test-data DIR --out DIR
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from mlip_ds.data.transforms import eval_transform
from mlip_ds.eval.datasets import open_labelled_dataset
from mlip_ds.eval.features import extract_features
from mlip_ds.eval.linear_probe import run_probe, write_reports


class GrayLevels(nn.Module):
    """(B, 3, H, W) images in [0, 1] (the repeated gray plane) -> (B, bins + 2) histogram, mean, std."""

    def __init__(self, bins: int = 16):
        super().__init__()
        self.bins = bins

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images[:, 0].flatten(1).clamp(0, 1)
        hist = torch.stack([torch.histc(g, bins=self.bins, min=0, max=1) for g in gray]) / gray.shape[1]
        return torch.cat([hist, gray.mean(1, keepdim=True), gray.std(1, keepdim=True)], dim=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-data", required=True)
    p.add_argument("--test-data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=64, help="the encoders' input size (tiny: 64)")
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    args = p.parse_args(argv)
    transform = eval_transform(args.image_size, (0.0,) * 3, (1.0,) * 3)  # gray levels in [0, 1]
    train = open_labelled_dataset(args.train_data, transform=transform)
    test = open_labelled_dataset(args.test_data, transform=transform, class_names=train.class_names)
    Xtr, Ytr = extract_features(GrayLevels(), train, desc="train")
    Xte, Yte = extract_features(GrayLevels(), test, desc="test")
    res = run_probe(Xtr, Ytr, Xte, Yte, train.label_names, fractions=[float(f) for f in args.fractions.split(",")],
                    seeds=[int(s) for s in args.seeds.split(",")], task=train.task, class_names=train.class_names)
    _, md_path, md = write_reports({"gray levels (no network)": res}, args.out)
    print(md)


if __name__ == "__main__":
    main()
