"""engine/: the LightningModule and its update loop, the graph path, checkpoint state, threads, the plain reference loop."""
