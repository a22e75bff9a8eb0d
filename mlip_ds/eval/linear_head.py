"""MGCA's linear-classification protocol: one linear layer trained on frozen features.

The probe's default is a cross-validated logistic regression (sklearn); MGCA, GLoRIA and MLIP
report a ``torch.nn.Linear`` trained with Adam on the frozen encoder's features instead. This
module gives that head behind the same small interface the probe uses (``fit``, ``predict_proba``,
``predict``), so ``linear_probe.fit_and_score(head="linear")`` swaps it in. Written here rather
than taken from sklearn because sklearn has no Adam-trained linear layer with MGCA's schedule.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class LinearLayerHead:
    """A standardised ``nn.Linear`` trained with AdamW (MGCA: lr 5e-4, weight decay 1e-6, batch 48,
    50 epochs), at least ``min_steps`` steps; binary targets use BCE, more classes cross-entropy."""

    def __init__(self, seed: int = 0, lr: float = 5e-4, weight_decay: float = 1e-6, batch_size: int = 48,
                 epochs: int = 50, min_steps: int = 200):
        self.seed, self.lr, self.weight_decay = seed, lr, weight_decay
        self.batch_size, self.epochs, self.min_steps = batch_size, epochs, min_steps

    def fit(self, X, y) -> "LinearLayerHead":
        X = np.asarray(X, dtype=np.float32)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("the linear head needs at least two classes in its training labels")
        self.mean_, self.std_ = X.mean(0), X.std(0) + 1e-6
        x = torch.from_numpy((X - self.mean_) / self.std_)
        index = {c: i for i, c in enumerate(self.classes_)}
        t = torch.tensor([index[v] for v in np.asarray(y)], dtype=torch.long)
        binary = len(self.classes_) == 2
        gen = torch.Generator().manual_seed(self.seed)
        layer = torch.nn.Linear(x.shape[1], 1 if binary else len(self.classes_))
        with torch.no_grad():  # zero init: the problem is convex, and few steps then cannot leave a
            layer.weight.zero_()  # random initial direction in place (the seed only orders batches)
            layer.bias.zero_()
        opt = torch.optim.AdamW(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        batch = min(self.batch_size, len(x))
        per_epoch = max(1, len(x) // batch)
        steps = max(self.min_steps, self.epochs * per_epoch)
        order = torch.randperm(len(x), generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + batch > len(x):
                order, pos = torch.randperm(len(x), generator=gen), 0
            idx = order[pos:pos + batch]
            pos += batch
            logits = layer(x[idx])
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], t[idx].float()) if binary
                    else F.cross_entropy(logits, t[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.layer_ = layer.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        x = torch.from_numpy((np.asarray(X, dtype=np.float32) - self.mean_) / self.std_)
        logits = self.layer_(x)
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], 1).numpy()
        return torch.softmax(logits, 1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
