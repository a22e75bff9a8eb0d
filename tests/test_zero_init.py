"""ZeRO-3 builds the towers under ``deepspeed.zero.Init``: each rank holds only its partition from the
start, and the weights are the ones the plain build gives on the same seed (so stages 0-3 still
train the same weights: tests/test_zero_configs.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

WORKER = r"""
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch
import deepspeed
import torch.distributed as dist
from mlip_ds.distributed import init_distributed
from mlip_ds.model.towers import build_model, load_model_config
from mlip_ds.train import param_groups

init_distributed()
rank = dist.get_rank()
cfg = load_model_config(sys.argv[2])
torch.manual_seed(0)
plain = build_model(cfg)
plain_rng = torch.get_rng_state()
plain_state = {k: v.clone() for k, v in plain.state_dict().items()}
plain_groups = [(g["weight_decay"], len(g["params"])) for g in param_groups(plain, 0.1)]
del plain
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
torch.manual_seed(0)
model = build_model(cfg, zero3_config=ds)
params = list(model.parameters())
rec = {"rank": rank, "world": dist.get_world_size(), "rng_equal": torch.equal(torch.get_rng_state(), plain_rng),
       "plain_numel": sum(v.numel() for k, v in plain_state.items() if not k.endswith("position_ids")
                          and k in dict(model.named_parameters())),
       "full_bytes": sum(p.ds_numel * p.element_size() for p in params),
       "held_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
       "local_numel": sum(p.numel() for p in params),
       "groups_equal": [(g["weight_decay"], len(g["params"])) for g in param_groups(model, 0.1)] == plain_groups}
differ = []
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if not torch.equal(p.data, plain_state[name]):
            differ.append(name)
rec["differ"] = differ
# --pretrained-text: transformers loads the folder's weights into the partitions (its HfDeepSpeedConfig route)
from transformers import AutoTokenizer, BertConfig, BertModel
folder = os.path.join(sys.argv[1], "bert")
if rank == 0:
    torch.manual_seed(7)
    BertModel(BertConfig.from_pretrained(cfg["text_cfg"]["hf_model_name"])).save_pretrained(folder)
    AutoTokenizer.from_pretrained(cfg["text_cfg"]["hf_tokenizer_name"]).save_pretrained(folder)
dist.barrier()
pcfg = load_model_config(sys.argv[2], text_model=folder)
torch.manual_seed(0)
loaded = build_model(pcfg, pretrained_text=True).state_dict()
torch.manual_seed(0)
pmodel = build_model(pcfg, pretrained_text=True, zero3_config=ds)
rec["pretrained_differ"] = []
for name, p in pmodel.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if not torch.equal(p.data, loaded[name]):
            rec["pretrained_differ"].append(name)
del pmodel
# zero_to_fp32 on a checkpoint of the partitioned model gives the full weights back
engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=params)
ckpt = os.path.join(sys.argv[1], "ckpt")
engine.save_checkpoint(ckpt, tag="t")
dist.barrier()
if rank == 0:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    full = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="t")
    rec["fp32_differ"] = sorted(set(dict(model.named_parameters())) ^ set(full)) + [
        k for k in full if k in plain_state and not torch.equal(full[k], plain_state[k])]
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(rec, f)
dist.barrier()
dist.destroy_process_group()
"""


def _run_ranks(tmp_path, model="tiny", ranks=2):
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), model], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow  # two processes (about 30 s on 2 idle cores)
def test_zero3_build_holds_half_the_model_per_rank_with_the_plain_weights(tmp_path):
    recs = _run_ranks(tmp_path)
    for r in recs:
        assert r["world"] == 2
        assert r["differ"] == []  # gathered, every tensor equals the plain build's, to the bit
        assert r["pretrained_differ"] == []  # and with --pretrained-text, the folder's weights
        assert r["rng_equal"]  # every rank's generator where the plain build leaves it (dropout masks)
        assert r["groups_equal"]  # weight-decay groups from the full shapes (ds_shape), not the empty ones
        assert r["local_numel"] == 0  # nothing but the partition is allocated after construction
        assert r["full_bytes"] == 4 * r["plain_numel"]
        # about half: each parameter's partition is ceil(numel / 2) elements
        assert 0.5 <= r["held_bytes"] / r["full_bytes"] < 0.5 + 1e-3, r
    assert sum(r["held_bytes"] for r in recs) >= recs[0]["full_bytes"]
    assert recs[0]["fp32_differ"] == []  # zero_to_fp32: every parameter, full and equal


def test_vit_l14_config_is_vit_large_with_a_bert_large_text_tower():
    import torch
    from mlip_ds.model.towers import available_models, build_model, load_model_config
    assert "vit-l14" in available_models()
    cfg = load_model_config("vit-l14")
    with torch.device("meta"):  # shapes only: no memory, no init
        model = build_model(cfg)
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    assert 300e6 < vision < 310e6  # ViT-L/14: 24 x 1024
    assert 300e6 < text < 310e6  # BERT-large: 24 x 1024 (packaged 1051-token vocabulary)
    assert model.text.transformer.config.num_hidden_layers == 24
