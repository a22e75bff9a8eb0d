"""Build the text-model folders shipped in ``mlip_ds/model/text_models/`` (their output is committed).

- ``tiny_bert``: a 2-layer, 64-wide BERT config and a WordPiece vocabulary trained with the
  ``tokenizers`` library on built-in synthetic reports plus a radiology word list, for CPU runs.
- ``bert_base``: a BERT-base-sized config (12 x 768) with the same vocabulary, for GPU-sized runs
  with random weights; ``bert_large`` the same at BERT-large size (24 x 1024, configs/vit-l14.json). Real runs pass ``--text-model DIR`` (e.g. a local Bio_ClinicalBERT).

Usage: python maintainer/build_text_models.py [--num-reports 3000] [--vocab-size 3000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "mlip_ds" / "model" / "text_models"

# Words a radiology report uses that the synthetic reports may not: keeps real reports (MIMIC-CXR,
# Open-i) from falling apart into single characters with the tiny tokenizer.
EXTRA_WORDS = """
chest radiograph frontal lateral view views pa ap portable upright supine semi-erect comparison prior
study studies interval change unchanged stable improved worsening new findings impression indication
history technique lungs lung clear clearly hyperinflated hyperexpanded emphysema copd fibrosis scarring
granuloma granulomas calcified calcification calcifications nodule nodules nodular mass masses lesion
opacity opacities opacification airspace disease infiltrate infiltrates consolidation consolidations
pneumonia aspiration atelectasis atelectatic subsegmental bibasilar basilar bibasal basal linear
discoid plate-like effusion effusions pleural thickening pneumothorax pneumothoraces hydropneumothorax
edema congestion vascular pulmonary interstitial alveolar kerley lines cephalization redistribution
heart cardiac cardiomegaly cardiomediastinal silhouette mediastinum mediastinal hilar hila hilum
contour contours aortic aorta tortuous tortuosity unfolded knob enlarged enlargement mildly moderately
severely normal size within limits top borderline upper lower middle lobe lobes lingula right left
bilateral bilaterally apex apices apical costophrenic angle angles blunting blunted diaphragm
hemidiaphragm hemidiaphragms elevated elevation flattening osseous structures bony thorax spine
thoracic degenerative changes fracture fractures rib ribs clavicle sternotomy wires surgical clips
tube tubes line lines catheter picc central venous endotracheal ett nasogastric enteric tip terminates
projects pacemaker pacer leads defibrillator device devices support stent valve prosthesis
acute cardiopulmonary process abnormality abnormalities evidence of no not without free focal
diffuse patchy hazy ill-defined dense small large moderate mild severe minimal trace tiny possible
possibly likely probable probably suspicious concerning consistent with compatible may might could
represent reflects cannot exclude excluded ruled out suggest suggests suggesting questionable
resolved resolving persistent increased decreased there is are be seen identified noted visualized
demonstrated appears appear again well expanded soft tissues upper abdomen bowel gas free air
. , : ; ( ) - / % 0 1 2 3 4 5 6 7 8 9 10 cm mm xxxx
"""


def corpus(num_reports: int) -> list[str]:
    from mlip_ds.sources.synthetic import generate
    texts = [s.report for s in generate(num_reports, seed=12345, size=64)]
    return texts + [" ".join(EXTRA_WORDS.split())] * 20


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> int:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                           limit_alphabet=200)
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True,
                            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    tok.save_pretrained(out_dir)
    return wp.get_vocab_size()


def bert_config(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-reports", type=int, default=3000)
    ap.add_argument("--vocab-size", type=int, default=3000)
    args = ap.parse_args()
    tiny, base, large = OUT / "tiny_bert", OUT / "bert_base", OUT / "bert_large"
    for d in (tiny, base, large):
        d.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(corpus(args.num_reports), args.vocab_size, tiny)
    (tiny / "config.json").write_text(json.dumps(bert_config(vocab, 64, 2, 2, 128), indent=2) + "\n")
    (base / "config.json").write_text(json.dumps(bert_config(vocab, 768, 12, 12, 3072), indent=2) + "\n")
    (large / "config.json").write_text(json.dumps(bert_config(vocab, 1024, 24, 16, 4096), indent=2) + "\n")
    print(f"wrote {tiny}, {base} and {large} (vocabulary {vocab} tokens)")


if __name__ == "__main__":
    main()
