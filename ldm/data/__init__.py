"""Data: webdataset-compatible shards (write, read, resume), transforms, the Lightning DataModule and built-ins."""
