"""Data: webdataset shard writing and listing, unpaired image/text pipelines."""
