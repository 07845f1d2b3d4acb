"""Data: webdataset shard writing and listing, the synthetic world, unpaired image/text pipelines."""
