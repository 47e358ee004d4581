"""chatforge: build a ChatGPT-style assistant end to end (pretrain -> SFT -> reward model -> PPO-ptx -> chat)."""

__version__ = "0.1.0"
