"""Plain PyTorch modules; nothing here knows about Lightning or Hydra."""
