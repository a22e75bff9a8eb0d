"""mlip-ds: MLIP medical vision-language pretraining on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="mlip-ds",
    version="0.1.0",
    description="MLIP (CVPR 2024) chest X-ray / report pretraining with DeepSpeed, WebDataset and open_clip",
    packages=find_packages(include=["mlip_ds", "mlip_ds.*"]),
    package_data={"mlip_ds": ["model/configs/*.json", "model/text_models/*/*", "knowledge/kb_data/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed==0.19.8",  # 0.19.7's ZeRO-3 corrupts parameters on CPU/gloo (stack notes)
        "open_clip_torch==3.3.0",
        "transformers>=4.40",
        "tokenizers",
        "webdataset==1.0.2",
        "einops",
        "tensorboard",
        "safetensors",
        "peft>=0.17",  # LoRA adapters (--lora-rank); target_parameters (nn.MultiheadAttention's in_proj) needs 0.17
        "scikit-learn",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        # Entity linking (mlip_ds/knowledge); scispacy pins numpy<2, which torch accepts.
        "scispacy==0.6.2",
        "spacy==3.8.18",
        "nmslib-metabrainz==2.1.3",
        "negspacy==1.1.0",
        # Real sources (make_shards: MIMIC-CXR / Open-i / any DICOM) and transfer metrics.
        "pydicom==3.0.2",
        "pycocotools==2.0.11",
    ],
    extras_require={
        "cluster": ["submitit==1.5.4"],
        "test": ["pytest", "pytest-timeout", "submitit==1.5.4"],
    },
    entry_points={
        "console_scripts": [
            "mlip-make-shards=mlip_ds.cli.make_shards:main",  # = python tools/make_shards.py
            "mlip-train=mlip_ds.train:main",  # one process; several: deepspeed mlip_ds/train.py / slurm/pretrain.sh
            "mlip-probe=mlip_ds.eval.linear_probe:main",
            "mlip-eval=mlip_ds.cli.eval:main",  # mlip-eval probe|finetune|zero-shot|retrieval|... ARGS
            "mlip-predict=mlip_ds.eval.predict:main",
        ],
    },
)
