"""Dataset readers, tokenization, packing and mixing: public data to training sequences (no torch here)."""
