"""From files to tensors: decode, sample, resize/pad/mask, conversations, datasets."""
