"""LightningDataModules for the XRec data format."""
