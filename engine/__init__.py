"""llm2vec-engine: decoder-only LLMs into text encoders (LLM2Vec) with Triton kernels and DeepSpeed."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import engine` stays light
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    if name == "LLM2Vec":
        from .llm2vec import LLM2Vec

        return LLM2Vec
    raise AttributeError(name)


__all__ = ["Encoder", "LLM2Vec"]
