"""Training stages. Each is a small module with its data loading, collate function and loss step."""
from .base import Stage


def build_stage(cfg, tokenizer):
    if cfg.stage == "mntp":
        from .mntp import MNTPStage

        return MNTPStage(cfg, tokenizer)
    if cfg.stage == "simcse":
        from .simcse import SimCSEStage

        return SimCSEStage(cfg, tokenizer)
    if cfg.stage == "supervised":
        from .supervised import SupervisedStage

        return SupervisedStage(cfg, tokenizer)
    raise ValueError(f"unknown stage {cfg.stage!r}")


__all__ = ["Stage", "build_stage"]
