"""Shards -> batches: shard-spec resolution, batch shapes, tokenization, bad samples skipped."""
import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from mlip_ds.data.pipeline import LoaderSpec, ShardPathError, expand_shards, make_train_loader
from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD
from mlip_ds.model.towers import build_tokenizer, load_model_config


def test_expand_shards_forms(synthetic_shards):
    d = synthetic_shards["train"]
    tars = sorted(str(p) for p in d.glob("*.tar"))
    assert expand_shards(str(d)) == tars
    assert expand_shards(str(d / "shard-{000000..000001}.tar")) == tars[:2]
    assert expand_shards(str(d / "*.tar")) == tars
    with pytest.raises(ShardPathError, match="make_shards"):
        expand_shards(str(d / "missing"))
    with pytest.raises(ShardPathError, match="not found"):
        expand_shards(str(d / "shard-{000000..000099}.tar"))


def test_tokenizer_knows_radiology_words():
    tok = build_tokenizer(load_model_config("tiny"))
    ids = tok(["No pneumothorax. Small left pleural effusion, possible consolidation."])[0]
    pieces = tok.tokenizer.convert_ids_to_tokens([i for i in ids.tolist() if i != 0])
    assert "[UNK]" not in pieces, pieces
    for word in ("pneumothorax", "effusion", "consolidation", "no", "."):
        assert word in pieces, pieces


def test_loader_yields_fixed_number_of_full_batches(synthetic_shards):
    cfg = load_model_config("tiny")
    spec = LoaderSpec(str(synthetic_shards["train"]), batch_size=8, batches_per_epoch=5, image_size=64,
                      mean=(0.5,) * 3, std=(0.25,) * 3, workers=2, shuffle_buffer=50, seed=0)
    batches = list(make_train_loader(spec, build_tokenizer(cfg)))
    assert len(batches) == 5
    for b in batches:
        assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
        assert b["text"].shape == (8, cfg["text_cfg"]["context_length"]) and b["text"].dtype == torch.long
        assert len(b["key"]) == 8
    # Same seed and epoch -> the same stream; another epoch -> another stream.
    again = [b["key"] for b in make_train_loader(spec, build_tokenizer(cfg))]
    other = [b["key"] for b in make_train_loader(spec, build_tokenizer(cfg), epoch=1)]
    assert again == [b["key"] for b in batches] and other != again


def test_bad_samples_are_skipped_not_fatal(tmp_path, caplog):
    good = io.BytesIO()
    Image.new("L", (32, 32), 128).save(good, format="png")
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for i in range(12):
            png = good.getvalue() if i % 3 else b"\x89PNG truncated"
            meta = {"id": str(i), "sections": {"findings": "x", "impression": ""}, "entities": [],
                    "labels": {}, "meta": {}}
            w.write({"__key__": f"k{i}", "png": png, "txt": "no effusion.", "json": json.dumps(meta)})
    spec = LoaderSpec(str(tmp_path), batch_size=4, batches_per_epoch=3, image_size=32,
                      mean=(0.5,) * 3, std=(0.25,) * 3, workers=0, shuffle_buffer=1, seed=0)
    keys = [k for b in make_train_loader(spec, build_tokenizer(load_model_config("tiny"))) for k in b["key"]]
    assert len(keys) == 12 and all(int(k[1:]) % 3 for k in keys)
    assert any("skipped bad sample" in r.message and "shard-000000.tar" in r.message for r in caplog.records)


def test_split_mode_gives_ranks_disjoint_shards(synthetic_shards, monkeypatch):
    cfg = load_model_config("tiny")
    keys = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        spec = LoaderSpec(str(synthetic_shards["train"]), batch_size=8, batches_per_epoch=12, image_size=64,
                          mean=(0.5,) * 3, std=(0.25,) * 3, workers=2, shuffle_buffer=10, seed=0, mode="split")
        keys[rank] = {k for b in make_train_loader(spec, build_tokenizer(cfg)) for k in b["key"]}
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    shard_of = lambda key: int(key.rsplit("-", 1)[1]) // 48  # noqa: E731  (48 samples per shard)
    assert {shard_of(k) for k in keys[0]} == {0, 2} and {shard_of(k) for k in keys[1]} == {1, 3}
    assert len(keys[0]) > 80  # 96 draws from its 96 samples: nearly all seen despite the shuffle buffer
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ShardPathError, match="at least ranks x workers"):
        make_train_loader(spec, build_tokenizer(cfg))


@pytest.mark.parametrize("workers,stop_after", [(2, 5), (0, 3)])
def test_resumed_loader_replays_the_rest_of_the_epoch_exactly(synthetic_shards, workers, stop_after):
    """Positions recorded from consumed batches + start_batch reproduce the uninterrupted stream,
    augmentation included (it is seeded per sample)."""
    tok = build_tokenizer(load_model_config("tiny"))
    spec = LoaderSpec(str(synthetic_shards["train"]), batch_size=4, batches_per_epoch=10, image_size=64,
                      mean=(0.5,) * 3, std=(0.25,) * 3, workers=workers, shuffle_buffer=20, seed=3)
    full = list(make_train_loader(spec, tok, epoch=1))
    positions = [0] * max(1, workers)
    for b in full[:stop_after]:
        positions[int(b["stream"][-1])] = int(b["pos"][-1])
    spec.batches_per_epoch = 10 - stop_after
    rest = list(make_train_loader(spec, tok, epoch=1, start_batch=stop_after, resume_positions=positions))
    assert [b["key"] for b in rest] == [b["key"] for b in full[stop_after:]]
    for a, b in zip(rest, full[stop_after:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def _write_corrupt_shards(root):
    """A shard with every kind of bad sample, and a truncated shard."""
    good = io.BytesIO()
    Image.new("L", (32, 32), 100).save(good, format="png")
    meta = json.dumps({"id": "x", "sections": {"findings": "", "impression": ""}, "entities": [],
                       "labels": {}, "meta": {}})
    with wds.TarWriter(str(root / "shard-000000.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"good{i}", "png": good.getvalue(), "txt": "no effusion.", "json": meta})
        w.write({"__key__": "truncated_image", "png": good.getvalue()[:40], "txt": "x", "json": meta})
        w.write({"__key__": "bad_json", "png": good.getvalue(), "txt": "x", "json": b"{not json"})
        w.write({"__key__": "missing_txt", "png": good.getvalue(), "json": meta})
        w.write({"__key__": "bad_utf8", "png": good.getvalue(), "txt": b"\xff\xfe", "json": meta})
    with wds.TarWriter(str(root / "shard-000001.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"tail{i}", "png": good.getvalue(), "txt": "no effusion.", "json": meta})
    data = (root / "shard-000001.tar").read_bytes()
    (root / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated tar


def test_every_kind_of_corrupt_data_is_skipped_counted_and_logged(tmp_path, caplog):
    _write_corrupt_shards(tmp_path)
    spec = LoaderSpec(str(tmp_path), batch_size=4, batches_per_epoch=6, image_size=32, mean=(0.5,) * 3,
                      std=(0.25,) * 3, workers=0, shuffle_buffer=1, seed=0, mode="split")
    batches = list(make_train_loader(spec, build_tokenizer(load_model_config("tiny"))))
    keys = {k for b in batches for k in b["key"]}
    assert keys <= {f"good{i}" for i in range(8)} | {f"tail{i}" for i in range(8)}
    assert int(batches[-1]["skipped"][-1]) >= 4  # the four bad samples of shard 0 (tar errors come on top)
    messages = " ".join(r.message for r in caplog.records)
    for key in ("truncated_image", "bad_json", "missing_txt", "bad_utf8"):
        assert key in messages and "shard-000000.tar" in messages
    assert "unreadable shard data" in messages and "shard-000001.tar" in messages


def test_gray_plane_transforms_equal_the_rgb_formulation():
    """The augmentations run on the gray plane and repeat it at the end: the same pixels (and the same
    random draws) as converting to RGB first, for the training and the evaluation transform."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from mlip_ds.data.pipeline import seed_cpu
    from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform

    image = Image.fromarray((np.random.default_rng(0).random((80, 72)) * 255).astype(np.uint8), "L")
    rgb_first = T.Compose([T.Grayscale(num_output_channels=3),
                           T.RandomResizedCrop(48, scale=(0.6, 1.0), ratio=(0.9, 1.1), antialias=True),
                           T.RandomAffine(degrees=5, translate=(0.03, 0.03)),
                           T.ColorJitter(brightness=0.2, contrast=0.2), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    for seed in range(5):
        seed_cpu(seed)
        ours = train_transform(48, intensity_jitter=0.2)(image)
        torch.manual_seed(seed)
        ref = rgb_first(image)
        assert ours.shape == ref.shape == (3, 48, 48) and torch.equal(ours, ref)
    ref_eval = T.Compose([T.Grayscale(num_output_channels=3), T.Resize(48, antialias=True), T.CenterCrop(48),
                          T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    for im in (image, image.convert("RGB")):
        assert torch.equal(eval_transform(48)(im), ref_eval(im))


def test_batch_tokenization_equals_per_sample_tokenization(synthetic_shards):
    """The loader tokenizes a batch's reports in one call: the same ids as one call per report."""
    cfg = load_model_config("tiny")
    tok = build_tokenizer(cfg)
    spec = LoaderSpec(str(synthetic_shards["train"]), 4, 2, cfg["preprocess"]["image_size"], CLIP_MEAN, CLIP_STD,
                      workers=0, raw=True, second_view=True)
    for batch in make_train_loader(spec, tok):
        assert torch.equal(batch["text"], torch.cat([tok(r) for r in batch["report"]]))
        assert batch["text2"].shape == batch["text"].shape and batch["text2"].dtype == torch.long
    texts = ["FINDINGS: No pleural effusion.  Heart   normal.", "", "IMPRESSION: " + "opacity " * 100,
             "ünïcödé — text\nwith lines"]
    assert torch.equal(tok(texts), torch.cat([tok(t) for t in texts]))



def test_intensity_jitter_zero_keeps_the_gray_levels():
    """--intensity-jitter 0: crops and affine moves only, so a uniform radiograph keeps its gray level
    in every draw; with the default jitter the level changes from draw to draw."""
    from mlip_ds.data.transforms import train_transform

    image = Image.new("L", (96, 96), color=100)

    def centre_values(jitter):
        t = train_transform(64, (0.0,) * 3, (1.0,) * 3, intensity_jitter=jitter)
        values = []
        for seed in range(8):
            torch.manual_seed(seed)
            values.append(float(t(image)[0, 32, 32]))
        return values

    assert centre_values(0.0) == pytest.approx([100 / 255] * 8, abs=1e-6)
    jittered = centre_values(0.2)
    assert max(jittered) - min(jittered) > 0.02
