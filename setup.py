from setuptools import find_packages, setup

setup(
    name="megafox",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining of the Fox-1 model family",
    python_requires=">=3.10",
    packages=find_packages(include=["megafox*", "data_prep*", "checkpoints_tools*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "psutil",
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers", "tokenizers", "protobuf"],
        # `megafox eval` and the in-loop evaluator: EleutherAI's lm-evaluation-harness, pinned
        # (megafox reads its task registry and results layout), with its `hf` model's deps
        "eval": ["lm_eval[hf]==0.4.13"],
        # `logging.trackers: [wandb, mlflow]` (docs/observability.md); mlflow-skinny: the tracking
        # client without the server's dependencies (a file store or a tracking server URI)
        "trackers": ["wandb>=0.19", "mlflow-skinny>=3"],
    },
    entry_points={
        "console_scripts": [
            "megafox=megafox.cli:main",
            "megafox-train=megafox.train:main",
            "megafox-to-hf=checkpoints_tools.to_hf:main",
            "megafox-from-hf=checkpoints_tools.from_hf:main",
            "megafox-ckpt=checkpoints_tools.cli:main",
        ]
    },
)
