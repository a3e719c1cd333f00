"""Lightning lives here: the LightningModule, stages and callbacks."""
