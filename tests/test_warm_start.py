"""Warm start from open_clip folders and checkpoint files, our export as an open_clip folder (both
directions), freezing and LoRA (peft): trainable counts, parameter groups, merged exports, and a
1-rank ZeRO-2 run that warm-starts, freezes, adapts, checkpoints, resumes and exports.
Everything is built from the tiny model; nothing is downloaded."""
import copy
import json
import shutil
import subprocess
import sys

import open_clip
import pytest
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_for_hf
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import load_file

from conftest import ROOT, train_env
from mlip_ds.config import ModelConfig
from mlip_ds.export import export_model, repoint
from mlip_ds.model import adapters, warm_start
from mlip_ds.model.towers import build_model, build_tokenizer, load_model_config
from mlip_ds.model.warm_start import WarmStartError

TINY_BERT = ROOT / "mlip_ds" / "model" / "text_models" / "tiny_bert"


def _open_clip_cfg():
    cfg = load_model_config("tiny")
    cfg.pop("preprocess")
    return cfg


def _open_clip_model(seed=1):
    """A tiny model built by open_clip itself (0-dim logit_scale), with non-default weights."""
    torch.manual_seed(seed)
    cfg = _open_clip_cfg()
    cfg["text_cfg"]["hf_model_pretrained"] = False  # the config only (no HF weights to read)
    model = open_clip.CustomTextCLIP(**cfg)
    set_model_preprocess_cfg(model, {"size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                     "interpolation": "bilinear", "resize_mode": "shortest"})
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    return model


def _same(ours: dict, theirs: dict):
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].reshape(ours[k].shape)), k


def _save_open_clip_folder(model, folder, **kw):
    save_for_hf(model, HFTokenizer(str(TINY_BERT), context_length=64), _open_clip_cfg(), str(folder), **kw)


def test_open_clip_folder_loads_both_towers_exactly(tmp_path):
    src = _open_clip_model()
    folder = tmp_path / "oc"
    _save_open_clip_folder(src, folder)  # open_clip's own writer: config, .safetensors and .bin, tokenizer
    assert {"open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"} <= {
        p.name for p in folder.iterdir()}
    cfg = warm_start.model_config("rn50", init_from=str(folder))  # the folder's model_cfg, not --model
    assert cfg["vision_cfg"] == _open_clip_cfg()["vision_cfg"] and cfg["text_cfg"]["hf_tokenizer_name"] == str(folder)
    assert cfg["preprocess"] == {"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = build_model(cfg, init_from=str(folder))
    _same(model.state_dict(), src.state_dict())
    assert model.logit_scale.shape == (1,)  # DeepSpeed-safe shape kept
    tok = build_tokenizer(cfg)  # the folder's tokenizer files: a known word is not [UNK]
    ids = tok(["pneumonia"])[0].tolist()
    assert tok.tokenizer.unk_token_id not in ids[:3] and ids[1] == tok.tokenizer.convert_tokens_to_ids("pneumonia")

    (folder / "open_clip_model.safetensors").unlink()  # the pickle-free torch file alone
    _same(build_model(cfg, init_from=str(folder)).state_dict(), src.state_dict())


def test_hub_text_model_name_needs_a_local_text_model(tmp_path):
    folder = tmp_path / "oc"
    _save_open_clip_folder(_open_clip_model(), folder, safe_serialization=True)
    meta = json.loads((folder / "open_clip_config.json").read_text())
    meta["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    (folder / "open_clip_config.json").write_text(json.dumps(meta))
    with pytest.raises(WarmStartError, match="--text-model"):
        warm_start.model_config("tiny", init_from=str(folder))
    cfg = warm_start.model_config("tiny", text_model=str(TINY_BERT), init_from=str(folder))
    _same(build_model(cfg, init_from=str(folder)).state_dict(), _open_clip_model().state_dict())


def test_checkpoint_file_with_model_name_and_mismatch_errors(tmp_path):
    src = _open_clip_model(seed=2)
    ckpt = tmp_path / "epoch_3.pt"  # open_clip's training checkpoint: DDP-prefixed state_dict + extras
    torch.save({"epoch": 3, "name": "x", "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    cfg = warm_start.model_config("tiny", init_from=str(ckpt))
    _same(build_model(cfg, init_from=str(ckpt)).state_dict(), src.state_dict())

    state = dict(src.state_dict())
    state.pop("text.proj.0.weight")
    state["visual.extra_head.weight"] = torch.zeros(2)
    state["visual.proj"] = torch.zeros(64, 32)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(WarmStartError) as e:
        build_model(cfg, init_from=str(bad))
    msg = str(e.value)
    assert "text.proj.0.weight" in msg and "visual.extra_head.weight" in msg
    assert "visual.proj (checkpoint [64, 32], model [64, 64])" in msg
    vis = tmp_path / "visual.pt"
    torch.save({k: v for k, v in src.state_dict().items() if k.startswith("visual.")}, vis)
    with pytest.raises(WarmStartError, match="--pretrained-image"):
        build_model(cfg, init_from=str(vis))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        warm_start.model_config("tiny", init_from=str(tmp_path))


def test_export_is_an_open_clip_folder_both_directions(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(3)
    ours = build_model(cfg).eval()
    out = export_model(ours, cfg, str(tmp_path / "export"))
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()  # our files kept
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    _same(ours.state_dict(), oc.state_dict())
    image = torch.rand(2, 3, 64, 64)
    text = build_tokenizer(cfg)(["no acute findings", "left lower lobe pneumonia"])
    oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(oc_tok(["no acute findings", "left lower lobe pneumonia"]), text)
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(image), ours.encode_image(image), atol=1e-6)
        assert torch.allclose(oc.encode_text(text), ours.encode_text(text), atol=1e-6)
    assert preprocess.transforms[1].size == (64, 64)

    # The trainer direction: the export is a valid --init-from folder.
    back = build_model(warm_start.model_config("tiny", init_from=str(out)), init_from=str(out))
    _same(back.state_dict(), ours.state_dict())

    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    # our loader falls back to the folder's own text_model/; open_clip needs the path rewritten
    _same(build_model(warm_start.model_config("tiny", init_from=str(moved)), init_from=str(moved)).state_dict(),
          ours.state_dict())
    repoint(str(moved))
    _same(open_clip.create_model(f"local-dir:{moved}").state_dict(), ours.state_dict())


def _counts(**choice):
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny"))
    return model, adapters.apply(model, adapters.TrainChoice(**choice))


def test_trainable_parameter_counts_for_each_choice():
    model, _ = _counts()
    vis = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    txt = sum(p.numel() for n, p in model.named_parameters() if n.startswith("text."))
    vproj = model.visual.proj.numel()
    tproj = sum(p.numel() for p in model.text.proj.parameters())

    _, c = _counts(freeze_image=True)
    assert c["visual"] == {"trainable": 0, "total": vis, "adapter": 0} and c["text"]["trainable"] == txt
    assert c["other"]["trainable"] == 1  # the temperature
    _, c = _counts(freeze_text=True)
    assert c["text"]["trainable"] == 0 and c["visual"]["trainable"] == vis
    _, c = _counts(freeze_towers_except_proj=True)
    assert c["visual"]["trainable"] == vproj and c["text"]["trainable"] == tproj

    r = 4
    # ViT (3 blocks, width 64, MLP 128): in_proj 192x64, c_fc 128x64, c_proj 64x128; A is r x in, B out x r.
    vit_lora = 3 * r * ((64 + 192) + (64 + 128) + (128 + 64))
    bert_lora = 2 * 2 * r * (64 + 64)  # 2 layers x (query, value), hidden 64
    model, c = _counts(lora_rank=r)
    assert c["visual"]["adapter"] == vit_lora and c["text"]["adapter"] == bert_lora
    assert c["visual"]["trainable"] == vit_lora + vproj and c["text"]["trainable"] == bert_lora + tproj
    assert c["visual"]["total"] == vis + vit_lora  # base weights kept (frozen)
    _, c = _counts(lora_rank=r, freeze_image=True)
    assert c["visual"]["trainable"] == 0 and c["visual"]["adapter"] == 0 and c["text"]["adapter"] == bert_lora
    _, c = _counts(lora_rank=r, lora_targets="query,key,value")
    assert c["visual"]["adapter"] == 0 and c["text"]["adapter"] == 3 * bert_lora // 2

    # Parameter groups: frozen parameters are in none; adapters take --lr, the pretrained towers --lr-pretrained.
    from mlip_ds.train import param_groups
    groups = param_groups(model, 0.05, lr=5e-4, pretrained=("visual.", "text."), lr_pretrained=2e-5)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) in by_id} == {n for n, p in named.items() if p.requires_grad}
    assert all(by_id[id(p)] == 5e-4 for n, p in named.items() if "lora_" in n or n == "logit_scale")
    assert by_id[id(model.visual.proj)] == 2e-5

    for bad, what in (("out_proj", "MultiheadAttention"), ("nothing_here", "no module")):
        with pytest.raises(adapters.TrainChoiceError, match=what):
            _counts(lora_rank=r, lora_targets=bad)


def test_lora_forward_trains_and_merged_export_is_base_plus_delta(tmp_path):
    cfg = load_model_config("tiny")
    model, _ = _counts(lora_rank=4, lora_alpha=8)
    torch.manual_seed(0)
    base = build_model(cfg).state_dict()  # same seed as _counts: the weights under the adapters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    image, text = torch.rand(2, 3, 64, 64), build_tokenizer(cfg)(["a", "b"])
    model.eval()
    with torch.no_grad():
        adapted = model.encode_image(image), model.encode_text(text)
    named = dict(model.named_parameters())
    out = export_model(adapters.merged_copy(model), cfg, str(tmp_path / "export"))
    assert adapters.has_adapters(model)  # merged_copy leaves the training model as it is
    merged = load_file(str(out / "open_clip_model.safetensors"))
    assert set(merged) == set(base) and not any("lora" in k or "base_layer" in k for k in merged)
    scale = 8 / 4
    for key, prefix in (("visual.transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.1.attn"),
                        ("visual.transformer.resblocks.2.mlp.c_fc.weight", "visual.transformer.resblocks.2.mlp.c_fc"),
                        ("text.transformer.encoder.layer.0.attention.self.value.weight",
                         "text.transformer.encoder.layer.0.attention.self.value")):
        delta = scale * named[f"{prefix}.lora_B.default.weight"] @ named[f"{prefix}.lora_A.default.weight"]
        assert delta.abs().max() > 0
        assert torch.allclose(merged[key], base[key] + delta, atol=1e-6), key
    for key in ("visual.transformer.resblocks.1.attn.out_proj.weight", "visual.conv1.weight",
                "text.transformer.encoder.layer.0.attention.self.key.weight"):
        assert torch.equal(merged[key], base[key]), key  # not adapted: untouched
    # A plain open_clip model (no peft) reproduces the adapted model's outputs.
    oc = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(image), adapted[0], atol=1e-5)
        assert torch.allclose(oc.encode_text(text), adapted[1], atol=1e-5)


def _train(args):
    cmd = [sys.executable, str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config",
           str(ROOT / "ds_configs" / "zero2.json")] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_warm_started_frozen_lora_run_resumes_under_zero2_and_exports_merged(synthetic_shards, tmp_path):
    """1 rank, ZeRO-2: --init-from an open_clip folder, image tower frozen, LoRA on the text tower;
    checkpoint at step 2, resume to step 4. Frozen weights are bit-identical to the folder's, the
    export is base + merged adapters, and it loads in open_clip without peft."""
    src = _open_clip_model(seed=4)
    folder = tmp_path / "oc"
    _save_open_clip_folder(src, folder, safe_serialization=True)
    out = tmp_path / "run"
    common = ["--train-shards", synthetic_shards["train"], "--out-dir", out, "--batch-size", "8",
              "--samples-per-epoch", "16", "--save-every", "2", "--log-every", "1", "--workers", "1",
              "--warmup-steps", "1", "--init-from", folder, "--freeze-image", "--lora-rank", "4", "--lr", "1e-2"]
    first = _train(common + ["--epochs", "1"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trainable parameters: visual 0/" in first.stderr
    second = _train(common + ["--epochs", "2", "--resume", "latest"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    # Another training choice on resume is refused before DeepSpeed loads anything.
    third = _train(common[:-5] + ["--freeze-text", "--epochs", "3", "--resume", "latest"])
    assert third.returncode == 2 and "trainable" in third.stderr, third.stderr[-2000:]

    init = src.state_dict()
    merged = load_file(str(out / "export" / "open_clip_model.safetensors"))
    assert set(merged) == set(init)
    module = torch.load(out / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    q = "text.transformer.encoder.layer.1.attention.self.query"
    adapted = {f"text.transformer.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    for key in init:
        if key.startswith("visual.") or (key.startswith("text.transformer.") and key not in adapted):
            assert torch.equal(merged[key], init[key]), key  # frozen: bit-identical after 4 steps
    delta = module[f"{q}.lora_B.default.weight"] @ module[f"{q}.lora_A.default.weight"]  # alpha = rank: scale 1
    assert delta.abs().max() > 0
    assert torch.equal(module[f"{q}.base_layer.weight"], init[f"{q}.weight"])
    assert torch.allclose(merged[f"{q}.weight"], init[f"{q}.weight"] + delta, atol=1e-6)
    assert not torch.equal(merged["text.proj.0.weight"], init["text.proj.0.weight"])  # projection trains
    oc = open_clip.create_model(f"local-dir:{out / 'export'}")
    _same(oc.state_dict(), {k: v for k, v in merged.items()})


def test_model_config_fields_exist():
    fields = ModelConfig()
    assert fields.init_from == "" and fields.lora_rank == 0 and fields.lora_targets == "auto"
    assert not (fields.freeze_image or fields.freeze_text or fields.freeze_towers_except_proj)
    assert copy.deepcopy(adapters.TrainChoice.from_model_config(fields)).active() is False


def test_lora_towers_under_the_full_mlip_objective():
    """All six terms on LoRA towers: adapters and projections get gradients, frozen weights none;
    the local term still reads the ViT's last-block CLS attention (through peft's wrapper), and the
    EMA towers copy the adapters."""
    import random

    from PIL import Image

    from mlip_ds.config import objective_preset
    from mlip_ds.data.text_augment import augment_report
    from mlip_ds.data.transforms import train_transform
    from mlip_ds.losses.objective import total_loss
    from mlip_ds.model.concepts import load_concepts
    from mlip_ds.model.mlip import MLIPModel
    from mlip_ds.objective.batch import BatchPreparer
    from mlip_ds.objective.terms import compute_terms
    from mlip_ds.sources.synthetic import generate_sample
    cfg = load_model_config("tiny")
    tok, vocab = build_tokenizer(cfg), load_concepts("", [])
    transform = train_transform(64, (0.5,) * 3, (0.25,) * 3)
    samples = [generate_sample(i, seed=1, size=64) for i in range(4)]
    images = [Image.fromarray(s.image) if not isinstance(s.image, Image.Image) else s.image for s in samples]
    batch = {"image": torch.stack([transform(im) for im in images]), "text": tok([s.report for s in samples]),
             "image2": torch.stack([transform(im) for im in images]),
             "text2": tok([augment_report(s.report, random.Random(i)) for i, s in enumerate(samples)]),
             "report": [s.report for s in samples], "entities": [s.entities for s in samples],
             "labels": [s.labels for s in samples]}
    objective = objective_preset("mlip", local_dim=32, local_heads=2, num_prototypes=16, tucker_rank_v=4,
                                 tucker_rank_t=4, tucker_rank_k=2, tucker_out=16)
    clip, _ = _counts(lora_rank=4)
    model = MLIPModel(clip, objective, len(vocab), len(vocab.categories), tok.tokenizer.all_special_ids)
    assert hasattr(model, "_image_attn") and any("lora_" in n for n, _ in model.ema_visual.named_parameters())
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu")
    out = model(**inputs)
    loss, _ = total_loss(compute_terms(out, inputs, objective, None), objective, step=10 ** 6)
    loss.backward()
    pw = out["patch_weights"]
    assert not torch.allclose(pw, torch.full_like(pw, 1 / pw.shape[-1]))
    for n, p in model.named_parameters():
        if n.startswith(("visual.", "text.")):
            assert (p.grad is not None) == p.requires_grad, n
            if "lora_B" in n or n == "visual.proj":  # B starts at 0, so A has no gradient at step 0
                assert p.grad.abs().max() > 0, n
