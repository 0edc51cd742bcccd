"""Engineering shared by every experiment: the LightningCLI, callbacks and the export format."""
