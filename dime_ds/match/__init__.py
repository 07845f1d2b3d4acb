"""Teacher embedding (embed stage) and DIME-FM's Algorithm 1 (grounded text corpus)."""
