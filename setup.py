from setuptools import setup

setup(
    name="llm2vec-engine",
    version="0.1.0",
    description="Turn decoder-only LLMs into text encoders (LLM2Vec) with Triton kernels and DeepSpeed ZeRO-3",
    packages=["engine", "llm2vec_kernels"],
    python_requires=">=3.10",
    install_requires=[
        # the releases the suite was run on: torch 2.13 (CI) and 2.11 with Triton 3.6 (the GPU image's; there
        # selective recompute is refused: engine.memory.selective_recompute_supported). Earlier ones fail: torch 2.4
        # lacks torch.serialization.safe_globals (the checkpoint loader), Triton 3.0's interpreter gets attention wrong
        "torch>=2.11",
        "triton>=3.6",
        # 5.2.0: the oldest that builds an export's attention from its config's "is_causal": false (5.0 / 5.1 load
        # it silently causal) and reads its tokenizer (4.57 cannot); engine.export.TRANSFORMERS_FLOOR, in every
        # model card; tests/test_versions.py
        "transformers>=5.2.0,<6",
        "peft>=0.13",
        "safetensors>=0.4",
        "deepspeed>=0.15",
        "pyyaml>=6",
        "tqdm",
        "numpy",
        "scipy",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        # sentence-transformers / mteb: from the versions tested (with transformers 5.x and torch 2.13) up to their
        # next major version (the export writes sentence-transformers 6's module configs; mteb 2.x's API)
        "dev": ["pytest>=8", "gguf>=0.10", "matplotlib", "tensorboard", "sentence-transformers>=6.2.0,<7",
                "mteb>=2.26.24,<3", "datasets"],
        "bench": ["matplotlib", "liger-kernel"],
        "flash": ["flash-attn"],
        "eval": ["mteb>=2.26.24,<3", "datasets", "sentence-transformers>=6.2.0,<7"],
        "export": ["sentence-transformers>=6.2.0,<7"],
    },
    entry_points={"console_scripts": ["llm2vec-engine-fetch=engine.assets:main"]},
)
