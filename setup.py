from setuptools import setup

setup(
    name="llm2vec-engine",
    version="0.1.0",
    description="Turn decoder-only LLMs into text encoders (LLM2Vec) with Triton kernels and DeepSpeed ZeRO-3",
    packages=["engine", "kernels"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.56",
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
        # sentence-transformers / mteb: pinned to the versions tested with transformers 5.x and torch 2.13
        "dev": ["pytest>=8", "gguf>=0.10", "matplotlib", "tensorboard", "sentence-transformers==6.2.0",
                "mteb==2.26.24", "datasets"],
        "bench": ["matplotlib", "liger-kernel"],
        "flash": ["flash-attn"],
        "eval": ["mteb==2.26.24", "datasets", "sentence-transformers==6.2.0"],
        "export": ["sentence-transformers==6.2.0"],
    },
    entry_points={"console_scripts": ["llm2vec-engine-fetch=engine.assets:main"]},
)
