"""panda: train, ablate and evaluate encoder-free video-language models of the Video-Panda kind.

Layout (data flows one way: file -> record -> sample -> batch -> model -> loss/metrics):

- ``panda.models``     plain ``nn.Module``s: STAB, projector, the video-language model.
- ``panda.data``       decode, sample, resize/pad/mask, conversations, datasets, the DataModule.
- ``panda.training``   the LightningModule, stages, callbacks.
- ``panda.evaluation`` generation on held-out questions and answer matching.
"""

__version__ = "0.1.0"
