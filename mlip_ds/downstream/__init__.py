"""Transfer of the pretrained image encoder to detection and segmentation (issue 7).

Thin per-task modules over one encoder (MGCA's ``*_detector.py`` / ``*_segmenter.py`` split):

* ``backbones``     the exported vision tower as a multi-scale backbone (ViT -> simple feature
                    pyramid, ModifiedResNet -> its stages), frozen or fine-tuned
* ``datasets``      readers (RSNA Pneumonia, Object-CXR, SIIM-ACR, generic CSV / folder pairs,
                    synthetic shards), RLE, seeded splits and label fractions
* ``detection``     Faster R-CNN / RetinaNet over the backbone, training, mAP (IoU 0.4:0.05:0.75) and AP50
* ``segmentation``  U-Net (ResNet) / SETR-PUP (ViT) heads, BCE + Dice loss, Dice and IoU
* ``transfer``      the encoders x fractions x seeds loop behind ``tools/transfer.py``, JSON/Markdown/PNG
"""
