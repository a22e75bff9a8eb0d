"""Model construction from the JSON registry, local weights only (nothing downloaded)."""
import pytest
import torch
from safetensors.torch import save_file

from mlip_ds.model.towers import available_models, build_model, build_tokenizer, load_model_config


@pytest.mark.parametrize("name", ["vit-b16", "rn50"])
def test_gpu_sized_models_build_and_run(name):
    cfg = load_model_config(name)
    model = build_model(cfg).eval()
    size = cfg["preprocess"]["image_size"]
    text = build_tokenizer(cfg)(["Small left pleural effusion."])
    with torch.no_grad():
        img, txt, scale = model(torch.randn(1, 3, size, size), text)
    assert img.shape == txt.shape == (1, cfg["embed_dim"])
    assert scale.shape == (1,)  # DeepSpeed 0.19.8 rejects 0-dim parameters
    assert all(p.dim() > 0 for p in model.parameters())


def test_registry_lists_configs_and_rejects_unknown():
    assert {"tiny", "vit-b16", "rn50"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown model"):
        load_model_config("vit-b-17")
    with pytest.raises(FileNotFoundError, match="--text-model"):
        load_model_config("tiny", text_model="/nonexistent/bert")


def test_local_text_model_weights_load_only_when_asked(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel
    base = load_model_config("tiny")["text_cfg"]["hf_model_name"]
    torch.manual_seed(7)
    bert = BertModel(BertConfig.from_pretrained(base))
    bert.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path)
    cfg = load_model_config("tiny", text_model=str(tmp_path))
    saved = bert.embeddings.word_embeddings.weight
    loaded = build_model(cfg, pretrained_text=True).text.transformer.embeddings.word_embeddings.weight
    fresh = build_model(cfg, pretrained_text=False).text.transformer.embeddings.word_embeddings.weight
    assert torch.equal(saved, loaded) and not torch.equal(saved, fresh)


def test_pretrained_image_weights_from_file(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(1)
    source = build_model(cfg)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    target = build_model(cfg, pretrained_image=str(path))
    for (k, a), b in zip(source.visual.state_dict().items(), target.visual.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        build_model(cfg, pretrained_image=str(tmp_path / "missing.pt"))


def test_text_tower_forward_equals_open_clips():
    """The sync-free forward (4-D mask, sliced CLS) gives open_clip's outputs, features and tokens."""
    from open_clip.hf_model import HFTextEncoder
    from mlip_ds.model.towers import SyncFreeHFTextEncoder
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    text = build_model(cfg).text.train()  # dropout on: the same seed must give the same draws
    assert type(text) is SyncFreeHFTextEncoder
    ids = build_tokenizer(cfg)(["Small left pleural effusion.", "No acute cardiopulmonary process. " * 3, ""])
    assert (ids == text.config.pad_token_id).any(1).all()  # every row padded: the mask matters
    for tokens in (False, True):
        text.output_tokens = tokens
        torch.manual_seed(1)
        ours = text(ids)
        torch.manual_seed(1)
        theirs = HFTextEncoder.forward(text, ids)
        for a, b in zip(*(o if tokens else (o,) for o in (ours, theirs))):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
